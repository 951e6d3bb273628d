"""The one exception tree of the runner, and the exit code each branch maps to.

Imports nothing from the rest of the package (it is the bottom of the module map).

    RunnerError                      exit 4 (internal error) unless a subclass says otherwise
    ├── UsageError                   exit 2: bad command line, spec or input; nothing was sent
    │   ├── SpecError                "path: field: message"
    │   ├── InputError               "path:line: message"
    │   ├── RunNotFound
    │   └── RunLocked                another process holds the run's lock
    └── RunStopped                   exit 3: stopped early, resumable
        ├── Interrupted              SIGINT / SIGTERM
        ├── AuthFailed               401 / 403 / unreachable endpoint on the first requests
        │   └── ModelRefused         404 / model_not_found before any answer of that model
        ├── QuotaExhausted           429 insufficient_quota and other billing errors
        └── StorageFailed            disk full, unwritable folder, fsync error

    AttemptError                     one HTTP attempt did not produce an answer (client.py raises)
    ├── HTTPStatusFailure            the server answered with an error status
    │   ├── RateLimited              429 (retryable, pauses the whole pool)
    │   ├── QuotaDenied             429/402 insufficient_quota, billing: stops the run
    │   ├── KeyRejected              401, 403: stops the run when it comes first
    │   ├── ServerFailure            408, 409, 5xx: retryable
    │   └── RequestRejected          400, 404, 422, other 4xx, redirects: the row fails
    │       └── ModelNotFound        404, model_not_found: stops the run when it comes first
    ├── ConnectFailure               the request never reached the server: not billed
    ├── TimeoutFailure               the total per-request deadline or a read timeout fired
    ├── ProtocolFailure              connection dropped or reset mid-answer
    ├── MalformedResponse            a 200 whose body is not a chat completion
    ├── OversizedResponse            the body passed max_response_bytes: not retried
    └── UndecodableResponse          a complete 200 in an encoding not asked for: not retried

Messages that may contain provider text are scrubbed of secrets where they are made
(client.py knows the key); nothing here formats a secret.
"""

from __future__ import annotations

from collections.abc import Mapping

EXIT_OK = 0
EXIT_FAILED_ROWS = 1
EXIT_USAGE = 2
EXIT_STOPPED = 3
EXIT_INTERNAL = 4


class RunnerError(Exception):
    """Base of every error the runner raises on purpose."""

    exit_code = EXIT_INTERNAL


class UsageError(RunnerError):
    """The user asked for something that cannot be done as asked; nothing was sent."""

    exit_code = EXIT_USAGE


class SpecError(UsageError):
    """A job spec is invalid: names the file and the dotted field."""

    def __init__(self, path: str, field: str, message: str) -> None:
        self.path = path
        self.field = field
        self.message = message
        super().__init__(f"{path}: {field}: {message}" if field else f"{path}: {message}")


class InputError(UsageError):
    """An input file is invalid: names the file and, when known, the line (1-based)."""

    def __init__(self, path: str, line: int | None, message: str) -> None:
        self.path = path
        self.line = line
        self.message = message
        where = f"{path}:{line}" if line is not None else path
        super().__init__(f"{where}: {message}")


class RunNotFound(UsageError):
    """No run matches the given run id, folder or job name."""


class RunLocked(UsageError):
    """Another process holds the run's lock."""

    def __init__(self, run_id: str, pid: int | None) -> None:
        self.run_id = run_id
        self.pid = pid
        holder = f"process {pid}" if pid else "another process"
        super().__init__(f"run {run_id} is in use by {holder}; wait for it or stop it first")


class RunStopped(RunnerError):
    """The run stopped before every row was done; it can be resumed."""

    exit_code = EXIT_STOPPED


class Interrupted(RunStopped):
    """A signal asked the run to stop."""


class AuthFailed(RunStopped):
    """The endpoint refused the credentials (or could not be reached) on the first requests."""


class ModelRefused(AuthFailed):
    """The server does not know a model (404 or model_not_found) and never answered it."""

    def __init__(self, model: str, message: str) -> None:
        self.model = model
        super().__init__(f"the server refused model {model!r}: {message}")


class QuotaExhausted(RunStopped):
    """The provider says the account has no quota or credit left."""


class StorageFailed(RunStopped):
    """Results could not be made durable (disk full, unwritable folder, fsync error)."""


class AttemptError(Exception):
    """One HTTP attempt failed; carries what the journal and the retry policy need.

    `error_type` is a stable machine name stored in results; `possibly_billed` says whether
    the provider may have charged for the attempt (the request was sent and no usable
    answer came back).
    """

    error_type = "error"
    retryable = False
    possibly_billed = False

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        # The few response headers retry and rate-limit decisions read (retry-after,
        # retry-after-ms, x-should-retry, x-ratelimit-*), lower-cased; parsed by retry/limiter.
        self.headers: Mapping[str, str] = headers or {}


class HTTPStatusFailure(AttemptError):
    error_type = "http_error"


class RateLimited(HTTPStatusFailure):
    error_type = "rate_limited"
    retryable = True


class QuotaDenied(HTTPStatusFailure):
    error_type = "insufficient_quota"


class KeyRejected(HTTPStatusFailure):
    error_type = "auth_error"


class ServerFailure(HTTPStatusFailure):
    error_type = "server_error"
    retryable = True
    possibly_billed = True


class RequestRejected(HTTPStatusFailure):
    error_type = "invalid_request"


class ModelNotFound(RequestRejected):
    """404 or an error code of model_not_found: a wrong model or a wrong endpoint path."""

    error_type = "model_not_found"


class ConnectFailure(AttemptError):
    error_type = "connect_error"
    retryable = True


class TimeoutFailure(AttemptError):
    error_type = "timeout"
    retryable = True
    possibly_billed = True


class ProtocolFailure(AttemptError):
    error_type = "connection_dropped"
    retryable = True
    possibly_billed = True


class MalformedResponse(AttemptError):
    error_type = "malformed_response"
    retryable = True
    possibly_billed = True


class OversizedResponse(AttemptError):
    """The answer's body, raw or decompressed, passed `[endpoint] max_response_bytes`.

    Not read further and not retried: the same request would get the same answer.
    """

    error_type = "response_too_large"
    possibly_billed = True


class UndecodableResponse(AttemptError):
    """A complete 200 whose body cannot be decoded (an encoding that was not asked for, or a
    corrupt one). It was paid for; buying it again would pay again for the same bytes."""

    error_type = "undecodable_response"
    possibly_billed = True


class UnwantedAnswer(AttemptError):
    """A paid answer whose finish_reason the spec asked to re-ask (run.retry_finish_reasons).

    Holds the answer so that, when attempts run out, the last one is kept rather than lost.
    """

    error_type = "unwanted_finish_reason"
    retryable = True

    def __init__(self, message: str, *, answer: object) -> None:
        super().__init__(message, status=200)
        self.answer = answer


def primary(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one exception a task group's failure is about.

    Task groups wrap failures in exception groups, often alongside the cancellations they
    caused. Prefer a RunStopped (a deliberate stop), then any other error that is not a
    cancellation, then whatever is first.
    """
    leaves: list[BaseException] = []

    def walk(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                walk(inner)
        else:
            leaves.append(exc)

    walk(group)
    for wanted in (RunStopped, RunnerError, Exception):
        for leaf in leaves:
            if isinstance(leaf, wanted):
                return leaf
    return leaves[0]
