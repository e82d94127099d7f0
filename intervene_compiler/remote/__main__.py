"""``python -m intervene_compiler.remote ...``: the same as ``intervene-serve ...``."""

from .server import main

if __name__ == "__main__":
    main()
