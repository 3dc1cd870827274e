"""Run flatnorm on a Dask scheduler that is already running (started by ``dask scheduler``/``dask worker``,
dask-gateway, a Kubernetes operator, ...).

    python workflows/existing_scheduler.py tcp://scheduler:8786 configs/lsstcam.yaml --input ... --output ...
    python workflows/existing_scheduler.py /shared/scheduler.json configs/lsstcam.yaml ...   # scheduler file

Any ``flatnorm run`` flag is accepted but ``--scheduler`` (the first argument is the scheduler).  The workers
must see the input files and the output store at the same paths as this client (shared file system).  Nothing
is started or stopped: the scheduler and its workers stay up for the next run.
"""

import sys

from flatnorm_dask.cli import console

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1].startswith("-"):
        sys.exit(__doc__)
    console(["run", *sys.argv[2:]], scheduler=sys.argv[1])
