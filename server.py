"""Run the mta-serve HTTP server from a checkout: `python server.py [options]` is `mta-serve [options]`.

The FastAPI application lives in mta_serve/server.py so that the installed `mta-serve` command finds it.
"""
import sys

from mta_serve.cli import main

if __name__ == "__main__":
    sys.exit(main())
