"""mitmweb 11's tornado routes adjusted for the mirror: streamed bodies and the focused flow."""

from __future__ import annotations

from typing import Any

#: Served by the web UI and loaded by its page: tells the server which flow the UI shows when a
#: command runs, so `@focus` means the selected flow (mitmweb 11's page never tells it otherwise;
#: its URL fragment `#/flows/<id>/<tab>` is the selection, and fragments are never sent).
FOCUS_SCRIPT = """(function () {
  var send = window.fetch;
  window.fetch = function (input, init) {
    var url = typeof input === "string" ? input : (input && input.url) || "";
    var m = /^#\\/flows\\/([0-9a-f-]+)\\//.exec(window.location.hash);
    if (m && init && init.method === "POST" && /\\/commands\\/[a-z.]+$/.test(url)) {
      init.headers = Object.assign({}, init.headers, {"X-Acr-Focus": m[1]});
    }
    return send.call(this, input, init);
  };
})();
"""
FOCUS_SCRIPT_PATH = "/acr-focus.js"
FOCUS_HEADER = "X-Acr-Focus"


def streamed_note(flow: Any) -> str:
    """What Download answers for a body that was streamed (mitmproxy keeps no copy of it)."""
    streamed = ((getattr(flow, "metadata", {}) or {}).get("acr") or {}).get("streamed") or {}
    detail = ""
    if streamed:
        detail = f" ({streamed.get('bytes')} bytes in {streamed.get('seconds')} s from {streamed.get('source')})"
    return (f"This body was streamed to the client{detail} and was not kept: mitmproxy stores no copy of a "
            "streamed body, so there is nothing to download.\n")


def web_handlers(app: Any) -> int:
    """Adjust mitmweb 11's tornado routes for the mirror; returns how many routes were changed.

    - Download of a streamed body (no content kept) answers a plain note instead of a 500.
    - The page loads FOCUS_SCRIPT, and `POST /commands/<name>` moves the view's focus to the flow
      the page shows before the command runs, so `acr.why @focus` explains the selected flow.
    """
    import tornado.routing
    import tornado.web
    from mitmproxy.tools.web import app as webapp

    class StreamedContent(webapp.FlowContent):
        def get(self, flow_id: str, message: str) -> None:
            part = getattr(self.flow, message, None)
            streamed = ((getattr(self.flow, "metadata", {}) or {}).get("acr") or {}).get("streamed")
            # A body mitmproxy streamed is None; one written past its layers is empty here.
            if part is not None and (getattr(part, "raw_content", b"") is None
                                     or (message == "response" and streamed and not part.raw_content)):
                name = self.flow.request.path.split("?")[0].split("/")[-1] or "body"
                self.set_header("Content-Disposition", f"attachment; filename={re_name(name)}.streamed.txt")
                self.set_header("Content-Type", "text/plain; charset=utf-8")
                self.set_header("X-Content-Type-Options", "nosniff")
                self.write(streamed_note(self.flow))
                return
            super().get(flow_id, message)

    class FocusedCommand(webapp.ExecuteCommand):
        def post(self, cmd: str) -> None:
            flow_id = self.request.headers.get(FOCUS_HEADER)
            found = self.view.get_by_id(flow_id) if flow_id else None
            if found is not None:
                self.view.focus.flow = found
            super().post(cmd)

    class Index(webapp.IndexHandler):
        def get(self) -> None:
            assert self.xsrf_token  # sets the XSRF cookie, as mitmweb's own index does
            page = self.render_string("index.html").decode()
            tag = '<script src="static/app.js"></script>'
            self.write(page.replace(tag, f'<script src=".{FOCUS_SCRIPT_PATH}"></script>{tag}', 1))

    class FocusScript(webapp.RequestHandler):
        def get(self) -> None:
            self.set_header("Content-Type", "application/javascript")
            self.write(FOCUS_SCRIPT)

    replace = {webapp.FlowContent: StreamedContent, webapp.ExecuteCommand: FocusedCommand,
               webapp.IndexHandler: Index}
    changed = 0
    for host_rule in app.default_router.rules:
        router = host_rule.target
        if not isinstance(router, tornado.routing.RuleRouter):
            continue
        if any(rule.target is webapp.IndexHandler for rule in router.rules):
            router.add_rules([(FOCUS_SCRIPT_PATH, FocusScript)])
            changed += 1
        for rule in router.rules:
            if rule.target in replace:
                rule.target = replace[rule.target]
                changed += 1
    return changed


def re_name(name: str) -> str:
    """A file name safe in a Content-Disposition header."""
    import re

    return re.sub(r"[^-\w.]", "_", name)[:120]
