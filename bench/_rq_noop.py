"""The bare-RQ baseline's job: reply through a Redis stream and do nothing else."""

from rq import get_current_job


def reply(stream: str, token: str) -> None:
    get_current_job().connection.xadd(stream, {"token": token})
