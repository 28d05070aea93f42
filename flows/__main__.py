"""`python -m flows [--profile demo] [--run-root DIR] ...`: the `full-pretrain` flow in-process (what `make demo`
runs); the same command line as `python -m flows.full_pretrain`.

Kept import-light on purpose: img2dataset starts its helper processes with `spawn`, which re-imports the main
module in every child; importing Prefect there would cost each download split several seconds. And the local
Prefect API (flows/local_api.py) starts before the pipeline is imported, so that the two overlap.
"""
import sys

if __name__ == "__main__":
    from flows.common import prefect_environment
    from flows.local_api import early_api

    prefect_environment()  # PREFECT_HOME first: the API server keeps its database there
    with early_api() as api:
        from flows.full_pretrain import main

        if api is not None:
            api.wait()
        sys.exit(main())
