"""The web page at /ui: a Gradio chat that uses only this service's public HTTP API.

Every action is an HTTP call to the service (`ui_api`), so the page shows exactly what any
client gets; `ui_markdown` turns the service's records into the chat's markdown. Only this
module imports gradio (the optional extra `ui`).
"""

# No `from __future__ import annotations`: gradio reads the handlers' `gr.Request` annotations.

import asyncio
import logging
import shutil
import tempfile
import time
import uuid
import weakref
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import gradio as gr
import httpx
from fastapi import FastAPI

from .config import Settings
from .files import size_text
from .ui_api import ApiError, ServiceApi
from .ui_markdown import attach_md, chat_messages, result_md

logger = logging.getLogger(__name__)

MOUNT_PATH = "/ui"


# -- the page -------------------------------------------------------------------------------

RUNNING = "Running… Stop interrupts the code it runs; the kernel keeps its variables."
_STOP_WATCH = 60.0  # seconds Stop waits for the turn to end before it lets the page go
_STOP_POLL = 0.5


def _running(on: bool) -> tuple[Any, Any, Any]:
    """The running line, the Send button and the Stop button, for a turn running or not."""
    return (
        gr.Markdown(RUNNING if on else ""),
        gr.Button(visible=not on),
        gr.Button("Stop", visible=on, interactive=on),
    )


class _Handlers:
    """The page's event handlers; each call speaks HTTP to the service."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.downloads = Path(tempfile.mkdtemp(prefix="kernel-agent-ui-"))

    def api(self, request: gr.Request, key: str | None) -> ServiceApi:
        return ServiceApi(self.settings, request, key or "")

    async def refresh_all(self, key: str | None, request: gr.Request) -> tuple[Any, ...]:
        """On load or a new key: the key (to show or save), the service line, models,
        sessions, skills, notes, and the settings panel (opened if the service wants a key).
        """
        api = self.api(request, key)
        notes: list[str] = []
        statuses: set[int | None] = set()

        async def get(path: str) -> Any:
            try:
                return (await api.call("GET", path)).json()
            except ApiError as exc:
                statuses.add(exc.status)
                if exc.status != 404 and str(exc) not in notes:
                    notes.append(str(exc))
                return None

        health, models, sessions, skills = await asyncio.gather(
            get("/health"), get("/v1/models"), get("/v1/sessions"), get("/v1/skills")
        )
        health = health or {}
        if health and not health.get("model_configured"):
            notes.append(
                "No model is configured: chat answers 503 until AGENT_MODEL is set "
                "(running code below still works)."
            )
        reachable = (health.get("kernel_mcp") or {}).get("reachable")
        about = (
            f"Model `{health.get('model') or 'none'}` · kernels "
            f"{'ready' if reachable else 'unreachable'}"
            if health
            else "The service is unreachable."
        )
        ids = [m["id"] for m in (models or {}).get("data", [])]
        listed = (skills or {}).get("data")
        skills_md = (
            "\n".join(f"- **{s['name']}**: {s.get('description', '')}" for s in listed)
            if listed
            else "*The service does not list skills (no `GET /v1/skills`).*"
        )
        return (
            key or "",
            about,
            gr.Dropdown(choices=ids, value=ids[0] if ids else None),
            _session_choices(sessions, None),
            skills_md,
            _status(notes),
            gr.Accordion(open=True) if 401 in statuses else gr.skip(),
        )

    async def send(
        self, message: str, history: list[Any], sid: str, model: str, key: str, request: gr.Request
    ) -> AsyncIterator[tuple[Any, ...]]:
        """Stream one turn into the chat."""
        message, sid = (message or "").strip(), sid or uuid.uuid4().hex
        if not message:
            yield gr.skip(), gr.skip(), gr.skip(), sid, *[gr.skip()] * 3
            return
        api = self.api(request, key)
        history = [*history, {"role": "user", "content": message}]
        # Only this first update empties the message box: what the user types meanwhile
        # stays there.
        running, idle = _running(True), _running(False)
        yield "", [*history, {"role": "assistant", "content": ""}], "", sid, *running
        text, images = "", dict[str, str]()
        try:
            async for delta in api.chat(sid, model or self.settings.model_alias, message):
                text += delta
                shown = await api.inline_images(text, images) if api.keyed else text
                chat = [*history, {"role": "assistant", "content": shown}]
                yield gr.skip(), chat, "", sid, *[gr.skip()] * 3
        except ApiError as exc:
            error = f"**Error:** {exc}"
            reply = f"{text}\n\n{error}" if text else error
            chat = [*history, {"role": "assistant", "content": reply}]
            yield gr.skip(), chat, error, sid, *idle
            return
        # The turn is saved: show it as recorded, with DataFrames as tables, not text.
        try:
            record = (await api.call("GET", f"/v1/sessions/{sid}")).json()
        except ApiError:
            yield gr.skip(), gr.skip(), gr.skip(), sid, *idle  # keep the streamed text
            return
        yield gr.skip(), chat_messages(record.get("events", [])), "", sid, *idle

    async def stop(self, sid: str, key: str, request: gr.Request) -> AsyncIterator[tuple[Any, ...]]:
        """Ask the service to stop the session's running turn, then show the turn as saved
        once it has ended (the page may not be streaming it: a session reopened mid-turn).

        Outputs: the chat, the status line, then the running line, Send and Stop.
        """
        if not sid:
            yield gr.skip(), gr.skip(), *[gr.skip()] * 3
            return
        api = self.api(request, key)
        try:
            await api.call("POST", f"/v1/sessions/{sid}/interrupt")
        except ApiError as exc:
            yield gr.skip(), f"**Error:** {exc}", *[gr.skip()] * 3
            return
        yield gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.Button("Stopping…", interactive=False)
        deadline = time.monotonic() + _STOP_WATCH
        while True:
            try:
                record = (await api.call("GET", f"/v1/sessions/{sid}")).json()
            except ApiError as exc:
                yield gr.skip(), f"**Error:** {exc}", *_running(False)
                return
            if not record.get("busy"):
                yield chat_messages(record.get("events", [])), "", *_running(False)
                return
            if time.monotonic() > deadline:
                still = "The turn has not ended yet; reopen the session to see it."
                yield gr.skip(), still, *_running(False)
                return
            await asyncio.sleep(_STOP_POLL)

    async def run_code(self, code: str, sid: str, key: str, request: gr.Request) -> tuple[Any, ...]:
        """Run the code box in the session's kernel, without the model."""
        sid = sid or uuid.uuid4().hex
        if not (code or "").strip():
            return "*Nothing to run.*", "", sid
        try:
            response = await self.api(request, key).call(
                "POST", f"/v1/sessions/{sid}/execute", json={"code": code}, long=True
            )
        except ApiError as exc:
            return f"**Error:** {exc}", f"**Error:** {exc}", sid
        return result_md(response.json()), "", sid

    async def open_session(self, chosen: str, key: str, request: gr.Request) -> tuple[Any, ...]:
        """Show a past session's history and make it the current one."""
        if not chosen:
            return gr.skip(), gr.skip(), "", "", *_running(False)
        try:
            record = (await self.api(request, key).call("GET", f"/v1/sessions/{chosen}")).json()
        except ApiError as exc:
            return gr.skip(), gr.skip(), f"**Error:** {exc}", "", *_running(False)
        busy = bool(record.get("busy"))
        note = "This session is running a turn right now: Stop interrupts it." if busy else ""
        return chosen, chat_messages(record.get("events", [])), note, "", *_running(busy)

    async def new_session(self) -> tuple[Any, ...]:
        """A session exists from its first message or code run; until then it has no id."""
        return "", [], "", "", "", *_running(False)

    async def ask_delete(self, sid: str) -> tuple[Any, ...]:
        """Show the confirmation of Delete, naming what goes."""
        if not sid:
            return gr.skip(), gr.skip()
        question = (
            f"Delete session `{sid[:8]}`? Its transcript, notebook, kernel and files are "
            "removed for good."
        )
        return gr.Group(visible=True), question

    async def delete_session(self, sid: str, key: str, request: gr.Request) -> tuple[Any, ...]:
        hidden = gr.Group(visible=False)
        if not sid:
            return (
                gr.skip(),
                gr.skip(),
                "Nothing to delete: this session has not started.",
                "",
                hidden,
            )
        try:
            await self.api(request, key).call("DELETE", f"/v1/sessions/{sid}")
        except ApiError as exc:
            return gr.skip(), gr.skip(), f"**Error:** {exc}", gr.skip(), hidden
        return "", [], f"Deleted session `{sid}`.", "", hidden

    async def attach(self, sid: str, key: str, request: gr.Request) -> str:
        if not sid:
            return "Send a message or run code first: that starts this session's kernel."
        try:
            info = (await self.api(request, key).call("GET", f"/v1/sessions/{sid}/kernel")).json()
        except ApiError as exc:
            return f"**Error:** {exc}"
        return attach_md(info)

    async def refresh(self, sid: str, key: str, request: gr.Request) -> tuple[Any, ...]:
        """The session list, the notebook download and the session's files, after anything
        that changed them."""
        api = self.api(request, key)

        async def get(path: str) -> httpx.Response | None:
            try:
                return await api.call("GET", path)
            except ApiError:  # no such session (yet), or the service is away
                return None

        sessions, notebook, listed = await asyncio.gather(
            get("/v1/sessions"),
            get(f"/v1/sessions/{sid}/notebook") if sid else asyncio.sleep(0),
            get(f"/v1/sessions/{sid}/files") if sid else asyncio.sleep(0),
        )
        choices = _session_choices(sessions.json() if sessions else None, sid)
        files = _file_choices(listed.json().get("data", []) if listed else [])
        if notebook is None:
            return choices, gr.DownloadButton(value=None, interactive=False), *files
        path = self.downloads / sid / f"{sid}.ipynb"  # the name the browser saves it as
        path.parent.mkdir(exist_ok=True)
        await asyncio.to_thread(path.write_bytes, notebook.content)
        return choices, gr.DownloadButton(value=str(path), interactive=True), *files

    async def upload(
        self, paths: list[str] | None, sid: str, key: str, request: gr.Request
    ) -> tuple[Any, ...]:
        """Files picked or dropped on the chat, into the session folder (made if new)."""
        if not paths:
            return gr.skip(), sid, gr.skip()
        sid = sid or uuid.uuid4().hex
        try:
            saved = await self.api(request, key).upload(sid, [Path(p) for p in paths])
        except ApiError as exc:
            return None, sid, f"**Error:** {exc}"
        names = ", ".join(f"`{f['path']}`" for f in saved)
        return None, sid, f"Added {names}: the agent hears of it with your next message."

    async def pick_file(
        self, path: str | None, sid: str, key: str, request: gr.Request
    ) -> tuple[Any, ...]:
        """A file chosen in the list: fetched, ready to download or delete."""
        if not path or not sid:
            return *_file_actions(None), gr.skip()
        # gradio serves a copy from its cache: earlier picks need not stay on disk here
        picks = self.downloads / sid / "files"
        await asyncio.to_thread(shutil.rmtree, picks, True)
        target = picks / uuid.uuid4().hex / Path(path).name  # the name the browser saves
        target.parent.mkdir(parents=True)
        try:
            await self.api(request, key).download(
                f"/v1/sessions/{sid}/files/{quote(path, safe='/')}", target
            )
        except ApiError as exc:
            return *_file_actions(None), f"**Error:** {exc}"
        return *_file_actions(str(target)), ""

    async def delete_file(self, path: str | None, sid: str, key: str, request: gr.Request) -> str:
        if not path or not sid:
            return ""
        try:
            await self.api(request, key).call(
                "DELETE", f"/v1/sessions/{sid}/files/{quote(path, safe='/')}"
            )
        except ApiError as exc:
            return f"**Error:** {exc}"
        return f"Deleted `{path}`."


def _file_actions(downloaded: str | None) -> tuple[Any, Any]:
    """The Download and Delete buttons of the chosen file (none chosen: both off)."""
    return (
        gr.DownloadButton(value=downloaded, interactive=downloaded is not None),
        gr.Button(interactive=downloaded is not None),
    )


NO_FILES = "No files yet: drop files on the chat or pick them here."


def _file_choices(files: list[dict[str, Any]]) -> tuple[Any, ...]:
    """The Files panel: its list (nothing chosen), a line about it, and its buttons.

    Hidden files and folders (caches libraries keep in their home, the session folder)
    are left out.
    """
    shown = [
        f
        for f in files
        if f.get("type", "file") == "file"
        and not any(part.startswith(".") for part in str(f["path"]).split("/"))
    ]
    choices = [(f"{f['path']} · {size_text(int(f.get('size') or 0))}", f["path"]) for f in shown]
    hint = "" if shown else NO_FILES
    return gr.Radio(choices=choices, value=None), hint, *_file_actions(None)


def _session_choices(sessions: Any, current: str | None) -> Any:
    data = (sessions or {}).get("data", [])
    choices = [(f"{s.get('title') or 'untitled'} · {s['id'][:8]}", s["id"]) for s in data]
    value = current if current in {s["id"] for s in data} else None
    return gr.Dropdown(choices=choices, value=value)


def _status(notes: list[str]) -> str:
    return "\n\n".join(f"**{n}**" for n in notes)


# The chat fills the window below the header and above the message box; the page itself
# does not scroll for it.
CSS = """
#chat { height: calc(100vh - 270px) !important; min-height: 320px; }
#header { align-items: baseline; }
#header h2 { margin: 0; }
#about { text-align: right; }
#turn-state { min-height: 1.4em; }
#turn-state p { margin: 0; color: var(--body-text-color-subdued); }
#turn-state p::before {
  content: ""; display: inline-block; width: 0.8em; height: 0.8em; margin-right: 0.5em;
  vertical-align: -0.1em; border: 2px solid currentColor; border-right-color: transparent;
  border-radius: 50%; animation: kernel-agent-spin 0.9s linear infinite;
}
@keyframes kernel-agent-spin { to { transform: rotate(360deg); } }
#chat.dropping { outline: 2px dashed var(--color-accent); outline-offset: -6px; }
"""
# Files dropped on the chat go to the Files panel's upload field, as if picked there.
JS = """
() => {
  const chat = () => document.getElementById("chat");
  const carriesFiles = (e) => [...(e.dataTransfer?.types || [])].includes("Files");
  document.addEventListener("dragover", (e) => {
    if (!carriesFiles(e) || !chat()?.contains(e.target)) return;
    e.preventDefault();
    e.dataTransfer.dropEffect = "copy";
    chat().classList.add("dropping");
  });
  document.addEventListener("dragleave", (e) => {
    if (!chat()?.contains(e.relatedTarget)) chat()?.classList.remove("dropping");
  });
  document.addEventListener("drop", (e) => {
    chat()?.classList.remove("dropping");
    const input = document.querySelector("#upload input[type=file]");
    if (!chat()?.contains(e.target) || !e.dataTransfer?.files.length || !input) return;
    e.preventDefault();
    input.files = e.dataTransfer.files;
    input.dispatchEvent(new Event("change", { bubbles: true }));
  });
}
"""


def build_ui(settings: Settings) -> gr.Blocks:
    """The page: chat, code box, sessions, model and key, skills."""
    h = _Handlers(settings)
    page = gr.Blocks(title="kernel-agent", analytics_enabled=False)
    with page:
        sid = gr.State("")
        saved_key = gr.BrowserState("", storage_key="kernel-agent-api-key")
        with gr.Row(elem_id="header"):
            gr.Markdown("## kernel-agent", elem_id="title")
            about = gr.Markdown(elem_id="about")
        status = gr.Markdown(elem_id="status")
        with gr.Row():
            with gr.Column(scale=1, min_width=280):
                sessions = gr.Dropdown(label="Sessions", choices=[], elem_id="sessions")
                with gr.Row():
                    new = gr.Button("New session", size="sm", elem_id="new-session")
                    # Enabled once a session is selected; asks before it deletes.
                    delete = gr.Button(
                        "Delete", size="sm", variant="stop", interactive=False, elem_id="delete"
                    )
                with gr.Group(visible=False, elem_id="delete-confirm") as confirm:
                    question = gr.Markdown(elem_id="delete-question", padding=True)
                    with gr.Row():
                        confirmed = gr.Button(
                            "Delete", size="sm", variant="stop", min_width=80, elem_id="delete-yes"
                        )
                        cancel = gr.Button("Keep it", size="sm", min_width=80, elem_id="delete-no")
                download = gr.DownloadButton(
                    "Download notebook", size="sm", interactive=False, elem_id="download"
                )
                with gr.Accordion("Files", open=True, elem_id="files"):
                    upload = gr.File(
                        label="Add files (or drop them on the chat)",
                        file_count="multiple",
                        height=140,
                        elem_id="upload",
                    )
                    files_hint = gr.Markdown(NO_FILES, elem_id="files-hint")
                    file_list = gr.Radio(choices=[], show_label=False, elem_id="file-list")
                    with gr.Row():
                        file_download = gr.DownloadButton(
                            "Download", size="sm", interactive=False, elem_id="file-download"
                        )
                        file_delete = gr.Button(
                            "Delete file", size="sm", interactive=False, elem_id="file-delete"
                        )
                with gr.Accordion("Attach JupyterLab", open=False):
                    attach = gr.Button("Show this session's kernel", size="sm", elem_id="attach")
                    attach_info = gr.Markdown(elem_id="attach-info")
                with gr.Accordion("Settings", open=False) as settings_panel:
                    model = gr.Dropdown(label="Model", choices=[], elem_id="model")
                    key = gr.Textbox(
                        label="API key",
                        type="password",
                        placeholder="needed only if the service sets AGENT_API_KEYS",
                        elem_id="api-key",
                    )
                with gr.Accordion("Skills", open=False):
                    skills = gr.Markdown(elem_id="skills")
            with gr.Column(scale=3):
                chat = gr.Chatbot(
                    show_label=False,
                    elem_id="chat",
                    feedback_options=None,
                    buttons=["copy"],
                )
                running = gr.Markdown(elem_id="turn-state")  # empty unless a turn runs
                with gr.Row(equal_height=True):
                    # One line that grows: Enter sends, Shift+Enter starts a new line.
                    message = gr.Textbox(
                        show_label=False,
                        placeholder="Ask the agent… (Enter sends, Shift+Enter starts a new line)",
                        lines=1,
                        max_lines=8,
                        scale=5,
                        elem_id="message",
                    )
                    send = gr.Button("Send", variant="primary", scale=1, elem_id="send")
                    stop = gr.Button("Stop", variant="stop", scale=1, visible=False, elem_id="stop")
                with gr.Accordion("Run Python in this session's kernel", open=False):
                    code = gr.Code(language="python", lines=4, show_label=False, elem_id="code")
                    run = gr.Button("Run", size="sm", elem_id="run")
                    code_output = gr.Markdown(elem_id="code-output")

        quick: dict[str, Any] = {"concurrency_limit": None, "show_progress": "hidden"}
        panel = [file_list, files_hint, file_download, file_delete]
        after = {
            "fn": h.refresh,
            "inputs": [sid, key],
            "outputs": [sessions, download, *panel],
            **quick,
        }
        overview = [key, about, model, sessions, skills, status, settings_panel]
        turn_state = [running, send, stop]
        page.load(h.refresh_all, [saved_key], overview, **quick)
        gr.on([key.submit, key.blur], h.refresh_all, [key], [saved_key, *overview[1:]], **quick)
        sent = gr.on(
            [send.click, message.submit],
            h.send,
            [message, chat, sid, model, key],
            [message, chat, status, sid, *turn_state],
            # A message sent while the last one still finishes is sent (the service answers
            # 409 if its turn still runs), never dropped without a word.
            trigger_mode="multiple",
            **quick,
        )
        sent.then(**after)
        # Stop shows the stopped turn once it ends: switching sessions meanwhile cancels that.
        stopped = stop.click(h.stop, [sid, key], [chat, status, *turn_state], **quick)
        run.click(
            h.run_code, [code, sid, key], [code_output, status, sid], concurrency_limit=None
        ).then(**after)
        # Delete is for the session shown, and only once it exists.
        sid.change(
            lambda current: (gr.Button(interactive=bool(current)), gr.Group(visible=False)),
            [sid],
            [delete, confirm],
            **quick,
        )
        delete.click(h.ask_delete, [sid], [confirm, question], **quick)
        cancel.click(lambda: gr.Group(visible=False), None, [confirm], **quick)
        # Leaving a session stops showing its stream; the turn itself runs on in the service.
        sessions.input(
            h.open_session,
            [sessions, key],
            [sid, chat, status, attach_info, *turn_state],
            cancels=[sent, stopped],
            **quick,
        ).then(**after)
        new.click(
            h.new_session,
            None,
            [sid, chat, status, attach_info, code_output, *turn_state],
            cancels=[sent, stopped],
            **quick,
        ).then(**after)
        confirmed.click(
            h.delete_session, [sid, key], [sid, chat, status, attach_info, confirm], **quick
        ).then(**after)
        attach.click(h.attach, [sid, key], [attach_info], **quick)
        upload.upload(h.upload, [upload, sid, key], [upload, sid, status], **quick).then(**after)
        file_list.input(
            h.pick_file, [file_list, sid, key], [file_download, file_delete, status], **quick
        )
        file_delete.click(h.delete_file, [file_list, sid, key], [status], **quick).then(**after)
    weakref.finalize(page, shutil.rmtree, h.downloads, True)
    return page


def mount_ui(app: FastAPI, settings: Settings) -> None:
    """Serve the page at /ui of `app`."""
    gr.mount_gradio_app(
        app,
        build_ui(settings),
        path=MOUNT_PATH,
        footer_links=[],
        run_history=False,
        ssr_mode=False,
        mcp_server=False,
        css=CSS,
        js=JS,
        show_error=False,
    )
    logger.info("web UI at %s", MOUNT_PATH)
