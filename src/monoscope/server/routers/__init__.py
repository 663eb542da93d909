"""The HTTP routes, one router per part of the API (FastAPI's "bigger applications" layout): `openai`
(/v1), `features` (the feature database), `model` (routes that run the model), `server` (health, info,
stats) and `ui` (the web pages). Each reaches the `Service` through `deps.get_service`."""
