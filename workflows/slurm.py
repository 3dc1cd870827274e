"""Run flatnorm on a SLURM cluster through dask-jobqueue (``pip install 'flatnorm-dask[jobqueue]'``).

    python workflows/slurm.py configs/slurm.yaml --input /data/flatStats --output scales.zarr --workers 8
    python workflows/slurm.py configs/slurm.yaml --print-job-script      # check the batch script first

The job shape (cores, memory, walltime, queue, account, ...) comes from the ``jobqueue.slurm`` settings in the
config's ``dask`` section (see configs/slurm.yaml), or from ``~/.config/dask/jobqueue.yaml``; ``--workers`` is
the number of jobs.  Run it from a login node that the compute nodes can reach.  ``--kind`` picks another
dask-jobqueue backend: ``pbs``, ``sge``, ``lsf``, ``htcondor``, or ``jobqueue-local`` (runs the jobs as local
processes: the same code path, for testing without a batch system).
"""

import argparse
import sys

from flatnorm_dask.cli import main
from flatnorm_dask.cluster import JOBQUEUE_KINDS

if __name__ == "__main__":
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--kind", default="slurm", choices=JOBQUEUE_KINDS)
    parser.add_argument("--print-job-script", action="store_true")
    known, rest = parser.parse_known_args()
    if known.print_job_script:
        import dask

        from flatnorm_dask.cluster import job_script
        from flatnorm_dask.config import load_config

        config = rest[0] if rest and not rest[0].startswith("-") else None
        with dask.config.set(load_config(config).dask_settings()):
            print(job_script(known.kind))
        sys.exit(0)
    sys.exit(main(["run", *rest, "--scheduler", known.kind]))
