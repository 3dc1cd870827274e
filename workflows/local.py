"""Run flatnorm on a LocalCluster on this machine.

    python workflows/local.py configs/lsstcam.yaml --input /repo/main --output scales.zarr [--workers 2]

Any ``flatnorm run`` flag is accepted but ``--scheduler`` (this script chooses the cluster; a config file's
``cluster.scheduler`` is replaced).  The cluster is sized to the machine (one single-threaded worker process
per core: parsing holds the GIL) unless ``--workers`` or the config's ``cluster`` section says otherwise.
"""

import sys

from flatnorm_dask.cli import console

if __name__ == "__main__":
    console(["run", *sys.argv[1:]], scheduler="local")
