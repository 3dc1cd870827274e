"""Run flatnorm on a SLURM cluster through dask-jobqueue (``pip install 'flatnorm-dask[jobqueue]'``).

    python workflows/slurm.py configs/slurm.yaml --input /repo/main --output scales.zarr --workers 8
    python workflows/slurm.py configs/slurm.yaml --print-job-script      # check the batch script first

The job shape (cores, memory, walltime, queue, account, ...) comes from the ``jobqueue.slurm`` settings in the
config's ``dask`` section (see configs/slurm.yaml), or from ``~/.config/dask/jobqueue.yaml``; ``--workers`` is
the number of jobs.  Run it from a login node that the compute nodes can reach.  ``--kind`` picks another
dask-jobqueue backend: ``pbs``, ``sge``, ``lsf``, ``htcondor``, or ``jobqueue-local`` (runs the jobs as local
processes: the same code path, for testing without a batch system).  Any ``flatnorm run`` flag is accepted but
``--scheduler`` (``--kind`` says it).  ``--print-job-script`` is ``flatnorm job-script``: it reads the same
config and flags as the run.
"""

import argparse
import sys

from flatnorm_dask.cli import console
from flatnorm_dask.cluster import JOBQUEUE_KINDS

if __name__ == "__main__":
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--kind", default="slurm", choices=JOBQUEUE_KINDS)
    parser.add_argument("--print-job-script", action="store_true")
    known, rest = parser.parse_known_args()
    command = "job-script" if known.print_job_script else "run"
    console([command, *rest], scheduler=known.kind)
