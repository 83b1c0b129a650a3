"""The SMTP server of the integration tests: aiosmtpd storing every accepted
message in a Maildir. Recipients are treated by how their local part starts:

- `reject`: a permanent 550;
- `busy`: a transient 451;
- `stall`: no answer to RCPT at all (the server hangs for an hour, as a
  stuck server does), so the client must time out;
- `slow`: accepted, but the server takes SLOW_SECS over the message (DATA).

Run as: python3 -m aiosmtpd -n -l 127.0.0.1:PORT -c smtp_sink.Sink MAILDIR
(with this folder on PYTHONPATH).
"""

import asyncio

from aiosmtpd.handlers import Mailbox

STALL_SECS = 3600
SLOW_SECS = 3


def _local(address):
    return address.split("@", 1)[0].lower()


class Sink(Mailbox):
    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        local = _local(address)
        if local.startswith("reject"):
            return "550 5.1.1 No such user here"
        if local.startswith("busy"):
            return "451 4.3.0 Try again later"
        if local.startswith("stall"):
            await asyncio.sleep(STALL_SECS)
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        if any(_local(a).startswith("slow") for a in envelope.rcpt_tos):
            await asyncio.sleep(SLOW_SECS)
        return await super().handle_DATA(server, session, envelope)

    @classmethod
    def from_cli(cls, parser, *args):
        if len(args) != 1:
            parser.error("the maildir path is required")
        return cls(args[0])
