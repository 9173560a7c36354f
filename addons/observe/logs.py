"""`acr_log_format`: the format of every line the mirror writes, mitmproxy's lines included.

`text` (the default) is one line per record with an RFC 3339 time and the level in front;
`json` is one JSON object per line for log shippers, with a request's fields (method, route,
repository, reference, status, digest, teleport, upstream, duration) on its line. The `acr`
command applies the format before mitmproxy starts, so the lines of the runtime steps match.
"""

from __future__ import annotations

from typing import Any

from mitmproxy import ctx, exceptions

from addons.core import logformat

OPTION = "acr_log_format"


class LogFormat:
    """Declares `acr_log_format` and sets it on the handlers that write the log."""

    name = "acr-log-format"

    def load(self, loader: Any) -> None:
        loader.add_option(
            OPTION, str, "text",
            "The format of every log line: 'text' (time, level, logger, message) or 'json' "
            "(one object per line: time, level, msg and a request's fields).",
            choices=logformat.FORMATS,
        )
        # `configure` sees the option only when it is set: the default applies from here.
        logformat.apply(loader.master.options.acr_log_format)

    def configure(self, updated: set[str]) -> None:
        if OPTION in updated:
            try:
                logformat.apply(ctx.options.acr_log_format)
            except ValueError as e:
                raise exceptions.OptionsError(str(e)) from None
