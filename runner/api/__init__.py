"""The Python API: start, resume and read runs from a script or a notebook.

    import runner
    run = runner.submit("jobs/summaries.toml")          # blocks, draws progress, returns a Run
    run = runner.run(df, model="gpt-4o-mini", prompt_column="text", id_column="id",
                     base_url="https://api.routeway.ai/v1", api_key_env="ROUTEWAY_API_KEY")
    run.results()                                       # a pyarrow.Table in input order
    run.report(); run.status(); run.query("SELECT ..."); run.export("out.parquet")
    runner.resume(run.id); runner.open("summaries")

The same run folders as the command line (`runner status/report/resume` work on runs started
here): each call goes through runner/engine/job.py, and the CLI's submit and resume go through
`submit_session` and `resume_session` (session.py), as runner.submit and runner.resume do.
`runner.run()` writes its spec as the run's frozen job.toml and a table in memory as the
run's input.parquet, so a resume needs nothing from the Python process that started the run.

Event loops: a blocking call runs the run's loop in the calling thread when no loop runs
there and it is the main thread (SIGINT/SIGTERM then drain the run as on the command line);
otherwise (inside Jupyter, whose loop is running, or in another thread) in a worker thread
with its own loop, where a KeyboardInterrupt of the waiting thread drains the run. Either
way, once the run is stopped and its folder consistent, KeyboardInterrupt goes on up. The
`*_async` variants run in the caller's loop and stop when cancelled.

Prints nothing itself (progress is drawn by runner/screens.py); imports no DataFrame
library: a pandas or polars DataFrame is recognised by its type's module and methods
(runner/input/memory.py).

    calls.py      submit, run, resume and their async variants; runner.run()'s spec
    session.py    a session to its end: the event loop, here or in a worker thread, interrupts,
                  progress, the simulator; what the command line shares
    handle.py     Run (results, report, status, query, export), Status, Report; open, runs
    spec_text.py  a job spec as TOML, for the run's frozen job.toml
"""

from runner.api.calls import resume, resume_async, run, run_async, submit, submit_async
from runner.api.handle import Report, Run, Status, open, runs
from runner.api.session import Session, resume_session, start_simulator, submit_session
from runner.api.spec_text import spec_toml

__all__ = [
    "Report",
    "Run",
    "Session",
    "Status",
    "open",
    "resume",
    "resume_async",
    "resume_session",
    "run",
    "run_async",
    "runs",
    "spec_toml",
    "start_simulator",
    "submit",
    "submit_async",
    "submit_session",
]
