"""Running a job: the worker pool, pacing (limiter, rate headers), the budget, submit and resume."""
