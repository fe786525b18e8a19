"""One run: everything between a plan and a published checkpoint, written once for every runner.

A run converts one plan into one output. In order:

1. :func:`start_run` -- refuse what must be refused before any write (inputs without a published digest, an
   output holding another run's checkpoint) and compute the run key (:mod:`requant.run.records`);
2. take the output's lease (:func:`output_lease`; the local runner leases the destination's parent) and unpublish
   whatever is there (:func:`begin_run`);
3. :func:`execute_job` for every layer job: skipped when its record says it is finished, else its shard is
   produced, moved into place while the lease holds, and its record written last;
4. :func:`input_record` -- what was read, each file checked against its publisher's digest;
5. :func:`publish` -- index, config, copied files, model card, and the manifest last;
6. :func:`summarize` into a :class:`ConvertSummary`.

The local runner (:func:`run_local`, behind ``requant convert --local`` and :func:`requant.convert`) takes these
steps in this process and its worker processes; the requantize flow (``flows/requantize.py``) takes the same steps
as Prefect tasks on Ray; the benchmarks run the CLI and the flow. Runners decide where a step runs, never how it
works.
"""

from requant.run.execute import JobOutcome, execute_job, execute_jobs, parallel_jobs
from requant.run.inputs import input_digest, input_files, input_record, unverifiable_inputs
from requant.run.local import run_local
from requant.run.options import ConvertOptions, ConvertSummary
from requant.run.ownership import LEASE_DIR, begin_run, check_lease, output_lease, published_key
from requant.run.publish import publish
from requant.run.records import completed, record_path, run_key
from requant.run.space import human_bytes
from requant.run.start import RunStart, start_run, summarize

__all__ = [
    "LEASE_DIR", "ConvertOptions", "ConvertSummary", "JobOutcome", "RunStart", "begin_run", "check_lease",
    "completed", "execute_job", "execute_jobs", "human_bytes", "input_digest", "input_files", "input_record",
    "output_lease", "parallel_jobs", "publish", "published_key", "record_path", "run_key", "run_local",
    "start_run", "summarize", "unverifiable_inputs",
]
