"""`python -m flows [--profile demo] [--run-root DIR] ...`: the `full-pretrain` flow in-process (what `make demo`
runs); the same command line as `python -m flows.full_pretrain`.

Kept import-light on purpose: img2dataset starts its helper processes with `spawn`, which re-imports the main
module in every child; importing Prefect there would cost each download split several seconds.
"""
import sys

if __name__ == "__main__":
    from flows.full_pretrain import main

    sys.exit(main())
