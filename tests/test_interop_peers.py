"""Round trips of monoscope's SAE format through the real peer packages, SAELens (`sae-lens`) and EleutherAI
sparsify (`eai-sparsify`).

The peers live in their own virtual environment (`make peers` builds build/peer-venv; sae-lens needs
transformer-lens<4, which does not fit monoscope's transformers), so each test runs a short script in that
environment's python as a subprocess: paths on argv, tensors both ways through safetensors files, the
peer's facts as one JSON line on stdout. Nothing is pickled. MONOSCOPE_PEER_PYTHON names another
interpreter. Without the interpreter or the package, the tests skip and say why.

- SAELens reads what monoscope writes (TopK, JumpReLU, BatchTopK saved as JumpReLU, ReLU saved as standard):
  same codes and reconstructions, same metadata.
- monoscope reads what SAELens writes (standard, topk, topk with rescale_acts_by_decoder_norm, jumprelu
  without b_dec on the input, gated) and what sparsify writes (SparseCoder.save_to_disk): same codes and
  reconstructions.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from monoscope.sae import (
    BatchTopKTrainingSAE,
    JumpReLUSAE,
    ReLUSAE,
    SAEConfig,
    TopKSAE,
    TrainConfig,
    load_sae,
    save_sae,
)
from monoscope.sae.io import sae_hook_point, sae_model_name
from monoscope.sae.loader import load_any_sae

REPO = Path(__file__).resolve().parent.parent
# Not resolved: a venv's bin/python is a symlink to the base interpreter, and only the link finds the venv.
PEER_PYTHON = Path(os.environ.get("MONOSCOPE_PEER_PYTHON") or REPO / "build" / "peer-venv" / "bin" / "python")
TIMEOUT_S = 300
D_IN, D_SAE, K, N_TOKENS = 64, 256, 16, 48
ATOL = 1e-5
MODEL = "HuggingFaceTB/SmolLM2-135M"


@functools.cache
def _peer_version(distribution: str, module: str) -> str | None:
    """The peer package's version in the peer python, or None when it is not installed there."""
    if not PEER_PYTHON.exists():
        return None
    probe = (
        "import importlib.metadata as m, importlib.util as u, sys\n"
        "print(m.version(sys.argv[1]) if u.find_spec(sys.argv[2]) else '')"
    )
    try:
        done = subprocess.run(
            [str(PEER_PYTHON), "-c", probe, distribution, module],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (done.stdout.strip() or None) if done.returncode == 0 else None


def _require(distribution: str, module: str) -> str:
    if not PEER_PYTHON.exists():
        pytest.skip(f"no peer python at {PEER_PYTHON}: run `make peers` (or set MONOSCOPE_PEER_PYTHON)")
    version = _peer_version(distribution, module)
    if version is None:
        pytest.skip(f"{PEER_PYTHON} has no {distribution}: run `make peers` (or set MONOSCOPE_PEER_PYTHON)")
    return version


def _run_peer(script: str, *args: str | Path) -> dict:
    """Run `script` in the peer python with `args` on argv; returns the JSON object it prints last."""
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(
        {
            "SPARSIFY_DISABLE_TRITON": "1",
            "CUDA_VISIBLE_DEVICES": "",
            "HF_HUB_OFFLINE": "1",
            "WANDB_MODE": "disabled",
            "TOKENIZERS_PARALLELISM": "false",
        }
    )
    done = subprocess.run(
        [str(PEER_PYTHON), "-c", script, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        env=env,
        check=False,
    )
    assert done.returncode == 0, f"the peer script failed (exit {done.returncode}):\n{done.stderr[-4000:]}"
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert lines, f"the peer script printed no JSON:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    return json.loads(lines[-1])


def _inputs(path: Path) -> torch.Tensor:
    x = torch.randn(N_TOKENS, D_IN, generator=torch.Generator().manual_seed(1)) * 1.5 + 0.2
    save_file({"x": x}, str(path))
    return x


def _close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    diff = (actual - expected).abs().max().item()
    assert torch.allclose(actual, expected, atol=ATOL, rtol=1e-5), f"{what}: max |difference| {diff:.3g}"


def _check_sparse(codes: torch.Tensor, what: str) -> None:
    """Codes worth comparing: some latents fire on every token, most do not."""
    active = (codes != 0).sum(-1)
    assert bool((active > 0).all()) and bool((active < D_SAE // 2).all()), (
        f"{what}: degenerate codes, L0 {active.tolist()}"
    )


# ---------------------------------------------------------------- SAELens reads monoscope's folders

SAELENS_READS = r"""
import json, sys
import torch
from safetensors.torch import load_file, save_file
from sae_lens import SAE

torch.set_num_threads(1)
x_path, out_path, folders = sys.argv[1], sys.argv[2], sys.argv[3:]
x = load_file(x_path)["x"]
tensors, facts = {}, {}
with torch.no_grad():
    for folder in folders:
        name = folder.rstrip("/").split("/")[-1]
        sae = SAE.load_from_disk(folder, device="cpu")
        codes = sae.encode(x)
        tensors[name + ".codes"] = codes.contiguous()
        tensors[name + ".recon"] = sae.decode(codes).contiguous()
        tensors[name + ".forward"] = sae(x).contiguous()
        meta = sae.cfg.metadata
        facts[name] = {"class": type(sae).__name__, "architecture": sae.cfg.architecture(),
                       "k": getattr(sae.cfg, "k", None), "apply_b_dec_to_input": sae.cfg.apply_b_dec_to_input,
                       "dtype": str(sae.dtype), "d_in": sae.cfg.d_in, "d_sae": sae.cfg.d_sae,
                       "hook_name": meta.hook_name, "model_name": meta.model_name,
                       "context_size": meta.context_size}
save_file(tensors, out_path)
print(json.dumps(facts))
"""

MONOSCOPE_WRITES = {
    # name: (SAELens class, architecture in cfg.json)
    "topk": ("TopKSAE", "topk"),
    "jumprelu": ("JumpReLUSAE", "jumprelu"),
    "batchtopk": ("JumpReLUSAE", "jumprelu"),
    "relu": ("StandardSAE", "standard"),
}


def _randomize(sae, generator: torch.Generator) -> None:
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(D_IN, D_SAE, generator=generator) / D_IN**0.5)
        sae.W_dec.copy_(torch.randn(D_SAE, D_IN, generator=generator) / D_SAE**0.5)
        sae.b_enc.copy_(torch.randn(D_SAE, generator=generator) * 0.1)
        sae.b_dec.copy_(torch.randn(D_IN, generator=generator) * 0.1)


def _monoscope_sae(name: str, seed: int):
    generator = torch.Generator().manual_seed(seed)
    if name == "batchtopk":
        sae = BatchTopKTrainingSAE(
            TrainConfig(
                d_in=D_IN, d_sae=D_SAE, k=K, total_tokens=4096, batch_size=64, architecture="batchtopk", seed=seed
            )
        )
        _randomize(sae, generator)
        with torch.no_grad():
            sae.inference_threshold.fill_(1.2)  # the one threshold every latent gets as a JumpReLU SAE
        return sae  # save_sae converts it to its inference form, JumpReLU
    cls, arch = {"topk": (TopKSAE, "topk"), "jumprelu": (JumpReLUSAE, "jumprelu"), "relu": (ReLUSAE, "standard")}[name]
    sae = cls(SAEConfig(d_in=D_IN, d_sae=D_SAE, architecture=arch, k=K if arch == "topk" else None))
    _randomize(sae, generator)
    if name == "jumprelu":
        with torch.no_grad():
            sae.threshold.copy_(torch.rand(D_SAE, generator=generator) * 1.5 + 0.3)
    elif name == "relu":
        with torch.no_grad():
            sae.b_enc.sub_(1.0)  # keep ReLU codes sparse enough to be meaningful
    return sae


@pytest.fixture(scope="module")
def saelens_reads_monoscope(tmp_path_factory):
    """monoscope writes one SAE per architecture; one peer process loads them all with SAELens."""
    _require("sae-lens", "sae_lens")
    root = tmp_path_factory.mktemp("monoscope-written")
    x = _inputs(root / "x.safetensors")
    saes, folders = {}, []
    for seed, name in enumerate(MONOSCOPE_WRITES):
        info = {"model_name": MODEL, "hook_name": "resid_post.3", "context_size": 128, "activation_scale": 1.0}
        folder = save_sae(_monoscope_sae(name, seed), root / name, info)
        saes[name] = load_sae(folder)  # what monoscope itself runs from the folder
        folders.append(folder)
    facts = _run_peer(SAELENS_READS, root / "x.safetensors", root / "out.safetensors", *folders)
    return x, saes, facts, load_file(str(root / "out.safetensors")), root


@pytest.mark.parametrize("name", list(MONOSCOPE_WRITES))
def test_saelens_reads_monoscope_saes(saelens_reads_monoscope, name):
    x, saes, facts, peer, root = saelens_reads_monoscope
    sae, fact = saes[name], facts[name]
    saelens_class, architecture = MONOSCOPE_WRITES[name]
    assert fact["class"] == saelens_class and fact["architecture"] == architecture
    assert (fact["d_in"], fact["d_sae"], fact["dtype"]) == (D_IN, D_SAE, "torch.float32")
    assert fact["apply_b_dec_to_input"] is True
    if architecture == "topk":
        assert fact["k"] == K
    # cfg.json's metadata reaches SAELens, the hook point in TransformerLens's spelling
    assert (fact["model_name"], fact["context_size"]) == (MODEL, 128)
    assert fact["hook_name"] == "blocks.3.hook_resid_post"  # the TransformerLens name SAELens attaches by
    assert sae.info["model_name"] == MODEL and sae.info["hook_name"] == "resid_post.3"
    if name == "batchtopk":
        assert json.loads((root / name / "cfg.json").read_text())["architecture"] == "jumprelu"
        assert torch.all(sae.threshold == 1.2)
    with torch.no_grad():
        codes, recon = sae.encode(x), sae.decode(sae.encode(x))
    _check_sparse(codes, name)
    if architecture == "topk":
        assert bool(((codes != 0).sum(-1) <= K).all())
    _close(peer[f"{name}.codes"], codes, f"{name}: SAELens encode vs monoscope")
    _close(peer[f"{name}.recon"], recon, f"{name}: SAELens decode vs monoscope")
    _close(peer[f"{name}.forward"], recon, f"{name}: SAELens forward vs monoscope")


# ---------------------------------------------------------------- monoscope reads SAELens's folders

SAELENS_WRITES = r"""
import json, sys
import torch
from safetensors.torch import load_file, save_file
from sae_lens import (GatedSAE, GatedSAEConfig, JumpReLUSAE, JumpReLUSAEConfig, StandardSAE, StandardSAEConfig,
                      TopKSAE, TopKSAEConfig)
from sae_lens.saes.sae import SAEMetadata

torch.set_num_threads(1)
x_path, out_path, root, d_in, d_sae, k, model = sys.argv[1], sys.argv[2], sys.argv[3], *map(int, sys.argv[4:7]), sys.argv[7]
x = load_file(x_path)["x"]
g = torch.Generator().manual_seed(0)
meta = lambda: SAEMetadata(model_name=model, hook_name="blocks.3.hook_resid_post", context_size=128)
saes = {
    "standard": StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=d_sae, metadata=meta())),
    "topk": TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=k, metadata=meta())),
    "topk_rescaled": TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=k, rescale_acts_by_decoder_norm=True, metadata=meta())),
    "jumprelu": JumpReLUSAE(JumpReLUSAEConfig(d_in=d_in, d_sae=d_sae, apply_b_dec_to_input=False, metadata=meta())),
    "gated": GatedSAE(GatedSAEConfig(d_in=d_in, d_sae=d_sae, metadata=meta())),
}
tensors, facts = {}, {}
with torch.no_grad():
    for name, sae in saes.items():
        for pname, p in sae.named_parameters():
            if pname == "threshold":
                p.copy_(torch.rand(p.shape, generator=g) * 1.5 + 0.3)
            elif pname == "W_dec":  # rows of varied norm, so the rescaled TopK's folding is exercised
                p.copy_(torch.randn(p.shape, generator=g) / d_sae**0.5 * (0.5 + torch.rand(d_sae, 1, generator=g)))
            elif pname == "W_enc":
                p.copy_(torch.randn(p.shape, generator=g) / d_in**0.5)
            else:  # biases, r_mag
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        if name == "standard":  # keep the codes sparse enough to be meaningful
            sae.b_enc.sub_(1.0)
        elif name == "gated":
            sae.b_gate.sub_(1.0)
        sae.save_model(f"{root}/{name}")
        codes = sae.encode(x)
        tensors[name + ".codes"] = codes.contiguous()
        tensors[name + ".recon"] = sae.decode(codes).contiguous()
        facts[name] = {"class": type(sae).__name__, "parameters": sorted(n for n, _ in sae.named_parameters())}
save_file(tensors, out_path)
print(json.dumps(facts))
"""

SAELENS_BECOMES = {
    # name: (monoscope inference architecture, apply_b_dec_to_input)
    "standard": ("standard", True),
    "topk": ("topk", True),
    "topk_rescaled": ("topk", True),
    "jumprelu": ("jumprelu", False),
    "gated": ("jumprelu", True),
}


@pytest.fixture(scope="module")
def monoscope_reads_saelens(tmp_path_factory):
    """One peer process builds SAELens SAEs with random weights, saves them, and encodes/decodes the inputs."""
    _require("sae-lens", "sae_lens")
    root = tmp_path_factory.mktemp("saelens-written")
    x = _inputs(root / "x.safetensors")
    facts = _run_peer(SAELENS_WRITES, root / "x.safetensors", root / "out.safetensors", root, D_IN, D_SAE, K, MODEL)
    return x, facts, load_file(str(root / "out.safetensors")), root


@pytest.mark.parametrize("name", list(SAELENS_BECOMES))
def test_monoscope_reads_saelens_saes(monoscope_reads_saelens, name):
    x, facts, peer, root = monoscope_reads_saelens
    assert name in facts, f"the peer did not build {name}"
    sae = load_sae(root / name)
    architecture, apply_b_dec = SAELENS_BECOMES[name]
    assert sae.cfg.architecture == architecture and sae.cfg.apply_b_dec_to_input is apply_b_dec
    assert (sae.cfg.d_in, sae.cfg.d_sae, sae.dtype) == (D_IN, D_SAE, torch.float32)
    if architecture == "topk":
        assert sae.cfg.k == K
    # SAELens's TransformerLens hook name and model, read from cfg.json's metadata
    assert sae_hook_point(sae) == "resid_post.3" and sae_model_name(sae) == MODEL
    mapped = load_any_sae(root / name).info  # which also records them in info
    assert mapped["hook_point"] == "resid_post.3" and mapped["model"] == MODEL
    with torch.no_grad():
        codes = sae.encode(x)
        recon = sae.decode(codes)
    _check_sparse(peer[f"{name}.codes"], name)
    _close(codes, peer[f"{name}.codes"], f"{name}: monoscope encode vs SAELens")
    _close(recon, peer[f"{name}.recon"], f"{name}: monoscope decode vs SAELens")


# ---------------------------------------------------------------- monoscope reads sparsify's folders

SPARSIFY_WRITES = r"""
import json, sys
import torch
from safetensors.torch import load_file, save_file
from sparsify import SparseCoder, SparseCoderConfig

torch.set_num_threads(1)
x_path, out_path, folder, d_in, d_sae, k = sys.argv[1], sys.argv[2], sys.argv[3], *map(int, sys.argv[4:7])
x = load_file(x_path)["x"]
torch.manual_seed(0)
coder = SparseCoder(d_in, SparseCoderConfig(num_latents=d_sae, k=k))  # its own random init (unit-norm decoder)
g = torch.Generator().manual_seed(1)
with torch.no_grad():  # sparsify starts with zero biases; give them values so they are checked too
    coder.encoder.bias.copy_(torch.randn(d_sae, generator=g) * 0.1)
    coder.b_dec.copy_(torch.randn(d_in, generator=g) * 0.1)
coder.save_to_disk(folder)
with torch.no_grad():
    out = coder.encode(x)
    recon = coder.decode(out.top_acts, out.top_indices)
    forward = coder(x)
save_file({"top_acts": out.top_acts.contiguous(), "top_indices": out.top_indices.contiguous(),
           "recon": recon.contiguous(), "forward_recon": forward.sae_out.contiguous()}, out_path)
print(json.dumps({"fvu": float(forward.fvu), "num_latents": coder.num_latents}))
"""


def test_monoscope_reads_sparsify_sae(tmp_path):
    _require("eai-sparsify", "sparsify")
    x = _inputs(tmp_path / "x.safetensors")
    folder = tmp_path / "sae" / "layers.3"
    facts = _run_peer(SPARSIFY_WRITES, tmp_path / "x.safetensors", tmp_path / "out.safetensors", folder, D_IN, D_SAE, K)
    peer = load_file(str(tmp_path / "out.safetensors"))
    assert facts["num_latents"] == D_SAE

    sae = load_sae(folder)
    assert sae.cfg.architecture == "topk" and sae.cfg.k == K and (sae.cfg.d_in, sae.cfg.d_sae) == (D_IN, D_SAE)
    assert sae.info["format"] == "sparsify" and sae.info["hook_point"] == "resid_post.3"
    with torch.no_grad():
        codes = sae.encode(x)
        values, indices = sae.encode_topk(x)
        recon = sae.decode(codes)
        sparse_recon = sae.decode_topk(values, indices)

    top_acts, top_indices = peer["top_acts"], peer["top_indices"].long()
    assert top_indices.shape == (N_TOKENS, K)
    assert bool((top_acts > 0).any(-1).all()), "sparsify's codes are all zero on some token"
    # the same latents, with the same values, token by token (both return them unsorted: compare as sets)
    same = torch.sort(indices, dim=-1).values == torch.sort(top_indices, dim=-1).values
    assert bool(same.all()), f"top-k latents differ on {int((~same.all(-1)).sum())} of {N_TOKENS} tokens"
    dense_peer = torch.zeros(N_TOKENS, D_SAE).scatter_(-1, top_indices, top_acts)
    _close(codes, dense_peer, "sparsify: monoscope encode vs sparsify's top-k")
    _close(torch.zeros(N_TOKENS, D_SAE).scatter_(-1, indices, values), dense_peer, "sparsify: encode_topk")
    _close(recon, peer["recon"], "sparsify: monoscope decode vs sparsify")
    _close(sparse_recon, peer["recon"], "sparsify: monoscope decode_topk vs sparsify")
    _close(peer["forward_recon"], peer["recon"], "sparsify: its forward vs its decode")
