"""Remote execution: ``remote=True`` sends a block to an intervention service as data (the IR, never code).

- ``client.py``: what ``remote=True`` does on the user's side (submit, follow, download, bind);
- ``server.py``: the service (FastAPI + uvicorn, a worker thread per model), ``intervene-serve``;
- ``jobs.py``: a request read and checked, run on a model; results and errors as data;
- ``allowlist.py``: the only callables and attributes a request may name;
- ``wire.py``: the message format (safetensors, a JSON document in its metadata);
- ``store.py``: jobs in SQLite, payloads and results as files; ``keys.py``: hashed API keys and limits.
"""
