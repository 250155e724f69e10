"""The operator-trainer contract, in one place for both sides (stdlib only: the operator
image ships it without torch): exit codes, the termination message's keys and size, and
the environment the operator sets for the trainer's control endpoints.

Exit codes (sysexits.h):
  0   done, adapter uploaded
  75  EX_TEMPFAIL: stopped on request after a checkpoint was committed (resumable)
  65  EX_DATAERR: the dataset is unusable (too many malformed records)
  66  EX_NOINPUT: no data shards, or no model files
  78  EX_CONFIG: the configuration is invalid
  1   anything else: an application failure, retried up to backoffLimit"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_DATA = 65
EXIT_NO_INPUT = 66
EXIT_PREEMPTED = 75
EXIT_CONFIG = 78
# sysexits' usage/configuration errors: never retried (EXIT_PREEMPTED aside)
PERMANENT_EXIT_CODES = range(64, 79)


def is_permanent(code: int | None) -> bool:
    return code in PERMANENT_EXIT_CODES and code != EXIT_PREEMPTED


# The termination message: one JSON object, within what the kubelet keeps of it.
MAX_MESSAGE = 4096
OUTCOME = "outcome"  # completed | preempted | config-error | data-error | no-input | fenced | failed
ERROR = "error"  # what went wrong, credentials scrubbed
STEP = "step"  # the last optimizer step finished
CHECKPOINT = "checkpoint"  # the last committed checkpoint: {step, uri, time}
GOODPUT = "goodput"  # the goodput ledger's report
ADAPTER = "adapter"  # the uploaded adapter: {uri, sha256, sizeBytes}
EVALUATION = "evaluation"  # the held-out evaluation
LINEAGE = "lineage"  # the adapter record's fingerprints: {base, data, shards}
MESSAGE_KEYS = (OUTCOME, ERROR, STEP, CHECKPOINT, GOODPUT, ADAPTER, EVALUATION, LINEAGE)


def message_body(outcome: str, **fields) -> dict:
    """The termination message's object: the outcome and the fields given (None left out);
    a key outside the contract is a bug on the writing side, caught here."""
    unknown = set(fields) - set(MESSAGE_KEYS)
    if unknown:
        raise ValueError(f"not termination-message keys: {sorted(unknown)}")
    return {OUTCOME: outcome, **{k: v for k, v in fields.items() if v is not None}}


# The trainer's control endpoints (POST /checkpoint, /start) take this bearer token.
CONTROL_TOKEN_ENV = "KUBETUNE_CONTROL_TOKEN"
# "1": start as a standby (load everything, then wait for POST /start before resuming)
STANDBY_ENV = "KUBETUNE_STANDBY"
