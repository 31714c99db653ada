"""The pack in ComfyUI's real web front end, driven through headless Chromium (DevTools protocol).

One browser session (module fixture ``session``) loads the page from the test server, loads every bundled
workflow through the template route the template browser uses, exercises the web extension, runs the
A14B workflow from the page's client id (tiny models, as in test_server_e2e) and records what it saw;
the tests below check the record. Screenshots go to test-artifacts/ (set WLM_UPDATE_DOCS_IMAGES=1 to also
refresh docs/images/).

Chromium is required: Debian's ``chromium`` (``bash scripts/install_browser.sh``) or ``$WLM_CHROMIUM``.
Without it the tests fail with that instruction; they never download a browser.
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import time
import urllib.parse

import aiohttp
import pytest

import cdp
import server_harness as H
from moe_core import workflow_api as ui_to_api

PACK = H.PACK_DIR
APP = "window.comfyAPI.app.app"
A14B = "wan22_a14b_t2v_lora_moe"
I2V = "wan22_i2v_a14b_lora_moe"
TI2V = "wan22_ti2v_5b_lora_moe"
CORE_TEMPLATE = "video_wan2_2_14B_t2v"  # ComfyUI's own A14B template, to check the converter against

#: Errors ComfyUI 0.3.64 with front end 1.27.10 logs on every page load without this pack (checked with the
#: pack's web folder absent): index.html links /user.css, which the server does not serve, and Chromium asks
#: for /favicon.ico. Anything else is a test failure.
BASELINE_ERRORS = [
    re.compile(r"^log \(network\): Failed to load resource: .*404.* http://127\.0\.0\.1:\d+/user\.css$"),
    re.compile(r"^log \(network\): Failed to load resource: .*404.* http://127\.0\.0\.1:\d+/favicon\.ico$"),
]


def unexpected(errors: list[str]) -> list[str]:
    return [e for e in errors if not any(p.match(e) for p in BASELINE_ERRORS)]


@pytest.fixture(scope="module")
def chromium():
    path = cdp.find_chromium()
    if path is None:
        pytest.fail("Chromium not found: install Debian's chromium with `bash scripts/install_browser.sh` "
                    "(apt-get install -y chromium) or point WLM_CHROMIUM at a Chromium/Chrome binary")
    return path


@pytest.fixture(scope="session")
def server():
    s = H.shared_server()
    yield s
    H.release_shared_server()


LOAD_WORKFLOW_JS = """
(async (url, name) => {
  const app = %(app)s;
  const LiteGraph = window.LiteGraph;
  const wf = await (await fetch(url)).json();
  const missing = wf.nodes.map((n) => n.type).filter((t) => !(t in LiteGraph.registered_node_types));
  await app.loadGraphData(wf, true, true, name, { showMissingModelsDialog: false });
  await new Promise((r) => requestAnimationFrame(() => setTimeout(r, 300)));
  const nodes = app.graph.nodes.map((n) => ({ id: n.id, type: n.type, registered: n.type in LiteGraph.registered_node_types,
    widgets: (n.widgets ?? []).map((w) => w.name) }));
  const prompt = await app.graphToPrompt();
  const dialogs = [...document.querySelectorAll(".p-dialog")].map((d) => d.innerText.slice(0, 300));
  return { missing, nodes, count: wf.nodes.length, output: prompt.output, dialogs };
})
""" % {"app": APP}

FIT_VIEW_JS = """
(async () => {
  const app = %(app)s;
  const nodes = app.graph.nodes;
  const x0 = Math.min(...nodes.map((n) => n.pos[0])), y0 = Math.min(...nodes.map((n) => n.pos[1] - 40));
  const x1 = Math.max(...nodes.map((n) => n.pos[0] + n.size[0])), y1 = Math.max(...nodes.map((n) => n.pos[1] + n.size[1]));
  app.canvas.ds.fitToBounds([x0, y0, x1 - x0, y1 - y0], { zoom: 0.95 });
  app.canvas.setDirty(true, true);
  await new Promise((r) => requestAnimationFrame(() => setTimeout(r, 600)));
  return app.canvas.ds.scale;
})()
""" % {"app": APP}


def _node_js(type_: str, body: str) -> str:
    return f"""(async () => {{ const app = {APP}; const node = app.graph.nodes.find((n) => n.type === "{type_}");
      {body} }})()"""


async def _session(server: H.ComfyServer, chromium: str) -> dict:
    rec: dict = {"workflows": {}, "timings": {}}
    browser = cdp.Browser(chromium, width=1920, height=1200).start()
    t_start = time.monotonic()
    try:
        async with aiohttp.ClientSession() as http:
            page = await browser.page(http)
            # 1. The page, with the pack's extension.
            await page.navigate(server.url)
            await page.wait_for(f"!!({APP} && {APP}.graph && window.LiteGraph?.registered_node_types?.WanLoRAMoE_TimestepBand"
                                f" && {APP}.extensions.some((e) => e.name === 'WanLoRAMoE.UI'))", timeout=120)
            await asyncio.sleep(1.0)
            rec["timings"]["page_load_s"] = time.monotonic() - t_start
            rec["extensions"] = await page.evaluate(f"{APP}.extensions.map((e) => e.name).filter((n) => n.startsWith('WanLoRAMoE'))")
            rec["extension_scripts"] = [u for u in page.requests if "/extensions/" in u]
            rec["load_errors"] = list(page.errors)
            # 2. Every bundled workflow, through the route ComfyUI's template browser uses.
            status, listing = server.get("/workflow_templates")
            rec["template_listing"] = listing.get(PACK, []) if status == 200 else listing
            for name in H.workflow_names():
                before = len(page.errors)
                url = f"/api/workflow_templates/{urllib.parse.quote(PACK)}/{urllib.parse.quote(name)}.json"
                result = await page.evaluate(f"({LOAD_WORKFLOW_JS})({json.dumps(url)}, {json.dumps(name)})")
                await page.evaluate(FIT_VIEW_JS)
                shot = await page.screenshot(H.ARTIFACTS / f"{name}.png")
                result["screenshot"] = str(shot)
                result["errors"] = page.errors[before:]
                rec["workflows"][name] = result
            # ComfyUI's own A14B template: the converter must agree with the front end there too.
            core = await page.evaluate(f"({LOAD_WORKFLOW_JS})('/templates/{CORE_TEMPLATE}.json', '{CORE_TEMPLATE}')")
            core["json"] = await page.evaluate(f"(async () => (await fetch('/templates/{CORE_TEMPLATE}.json')).json())()")
            rec["core_template"] = core
            # 3. The web extension on the A14B workflow: live previews.
            url = f"/api/workflow_templates/{urllib.parse.quote(PACK)}/{A14B}.json"
            await page.evaluate(f"({LOAD_WORKFLOW_JS})({json.dumps(url)}, '{A14B}')")
            await page.evaluate(FIT_VIEW_JS)
            router_text = "node.widgets.find((w) => w.name === 'wlm_detected').element.innerText"
            rec["router_preview"] = await page.wait_for(
                _node_js("WanLoRAMoE_PromptRouter", f"const t = {router_text}; return t.includes('preview:') && t;"),
                timeout=30)
            band = "WanLoRAMoE_TimestepBand"
            rec["band_initial"] = await page.evaluate(_node_js(band, """
              return { levels: node.wlmDrawn?.levels, image: node.wlmCanvas.toDataURL() };"""))
            rec["band_edited"] = await page.evaluate(_node_js(band, """
              const w = node.widgets.find((x) => x.name === "start");
              w.value = 0.45; w.callback?.(w.value);
              await new Promise((r) => setTimeout(r, 200));
              return { levels: node.wlmDrawn?.levels, image: node.wlmCanvas.toDataURL() };"""))
            rec["band_invalid"] = await page.evaluate(_node_js(band, """
              const w = node.widgets.find((x) => x.name === "start");
              w.value = 0.9; w.callback?.(w.value);
              await new Promise((r) => setTimeout(r, 200));
              const error = node.wlmDrawn?.error;
              w.value = 0.2; w.callback?.(w.value);
              return { error };"""))
            # The band's dotted pair boundary before any run, read from the LoRA-MoE file each workflow loads
            # (the tiny file of its family): T2V 0.875, I2V 0.9, none for TI2V 5B's single DiT.
            rec["band_boundary_before_run"] = {}
            for name, tiny in ((A14B, H.TINY_MOE), (I2V, H.TINY_MOE_I2V), (TI2V, H.TINY_MOE_TI2V)):
                url = f"/api/workflow_templates/{urllib.parse.quote(PACK)}/{name}.json"
                await page.evaluate(f"({LOAD_WORKFLOW_JS})({json.dumps(url)}, '{name}')")
                rec["band_boundary_before_run"][name] = await page.wait_for(f"""(() => {{
                  const app = {APP};
                  for (const n of app.graph.nodes.filter((n) => n.type === "WanLoRAMoE_LoadLoRAMoE")) {{
                    const w = n.widgets.find((x) => x.name === "lora_moe");
                    if (w.value !== {json.dumps(tiny)}) {{ w.value = {json.dumps(tiny)}; }}
                  }}
                  const bands = app.graph.nodes.filter((n) => n.type === "{band}");
                  bands.forEach((n) => n.wlmRedraw());
                  const seen = bands.map((n) => n.wlmDrawn?.boundary);
                  return seen.every((b) => b !== undefined && b !== 0.875) || {json.dumps(name)} === "{A14B}"
                    ? {{ boundaries: seen }} : false;
                }})()""", timeout=20)
            await page.evaluate(f"({LOAD_WORKFLOW_JS})({json.dumps(f'/api/workflow_templates/{urllib.parse.quote(PACK)}/{A14B}.json')}, '{A14B}')")
            # 4. Run it (tiny models) from this page's client id: the nodes' onExecuted must show the results.
            client_id = await page.evaluate(f"{APP}.api.clientId")
            prompt, _ = H.api_prompt(H.load_workflow(A14B), server.object_info(), A14B + "_browser")
            for node in prompt.values():  # a seed of its own, so that it really runs
                if node["class_type"] == "KSamplerAdvanced" and node["inputs"]["add_noise"] == "enable":
                    node["inputs"]["noise_seed"] += 7
            status, body = server.request("POST", "/prompt", {"prompt": prompt, "client_id": client_id})
            assert status == 200, body
            t0 = time.monotonic()
            rec["run_history"] = server.wait(body["prompt_id"])
            rec["timings"]["browser_run_s"] = time.monotonic() - t0
            rec["router_after_run"] = await page.wait_for(
                _node_js("WanLoRAMoE_PromptRouter", f"const t = {router_text}; return t.startsWith('[rule]') && t;"),
                timeout=30)
            rec["band_after_run"] = await page.wait_for(_node_js(band, """
              return node.wlmSchedule && { experts: node.wlmSchedule.experts, rawVsT: !!node.wlmDrawn?.rawVsT };"""),
                timeout=30)
            await page.evaluate(FIT_VIEW_JS)
            await page.screenshot(H.ARTIFACTS / f"{A14B}_after_run.png")
            rec["final_errors"] = list(page.errors)
            rec["console"] = list(page.console)
            await page.close()
    finally:
        browser.stop()
    rec["timings"]["browser_session_s"] = time.monotonic() - t_start
    H.ARTIFACTS.mkdir(exist_ok=True)
    (H.ARTIFACTS / "browser_timings.json").write_text(json.dumps(rec["timings"], indent=1))
    if os.environ.get("WLM_UPDATE_DOCS_IMAGES"):
        update_docs_images()
    return rec


def graph_only(path):
    """The screenshot cropped to the drawn graph (no side bar, menu or empty canvas)."""
    from PIL import Image

    shot = Image.open(path).convert("RGB")
    canvas = shot.crop((70, 80, shot.width, shot.height - 60))
    box = canvas.convert("L").point(lambda v: 255 if v > 70 else 0).getbbox()
    if box:
        pad = 16
        canvas = canvas.crop((max(0, box[0] - pad), max(0, box[1] - pad), min(canvas.width, box[2] + pad),
                              min(canvas.height, box[3] + pad)))
    return canvas


def write_thumbnail(name: str) -> None:
    """workflows/<name>.jpg (the name the template browser asks for) from this session's screenshot."""
    thumb = graph_only(H.ARTIFACTS / f"{name}.png")
    thumb.thumbnail((800, 800))
    thumb.save(H.WORKFLOW_DIR / f"{name}.jpg", quality=85)


def update_docs_images() -> None:
    """Copy the screenshots the README uses into docs/images and write the template browser's thumbnails
    (workflows/<name>.jpg). Only with WLM_UPDATE_DOCS_IMAGES=1."""
    docs = H.REPO_ROOT / "docs" / "images"
    docs.mkdir(parents=True, exist_ok=True)
    graph_only(H.ARTIFACTS / f"{A14B}.png").save(docs / "a14b_workflow.png", optimize=True)
    graph_only(H.ARTIFACTS / f"{A14B}_after_run.png").save(docs / "a14b_workflow_after_run.png", optimize=True)
    for name in H.workflow_names():
        write_thumbnail(name)


@pytest.fixture(scope="module")
def session(server, chromium):
    return asyncio.run(_session(server, chromium))


def test_page_loads_with_the_extension_and_no_console_errors(session):
    assert session["extensions"] == ["WanLoRAMoE.UI"]
    assert any(u.endswith(f"/extensions/{PACK}/wan_lora_moe.js") for u in session["extension_scripts"])
    assert unexpected(session["load_errors"]) == [], "\n".join(session["load_errors"])


def test_every_bundled_workflow_loads_with_no_missing_nodes(session, server):
    assert sorted(session["template_listing"]) == H.workflow_names(), "served by ComfyUI's template route"
    for name in H.workflow_names():  # the template browser shows <name>.jpg beside each workflow
        status, _ = server.get(f"/api/workflow_templates/{urllib.parse.quote(PACK)}/{name}.jpg")
        assert status == 200, f"no thumbnail workflows/{name}.jpg (regenerate with WLM_UPDATE_DOCS_IMAGES=1)"
    assert sorted(session["workflows"]) == sorted([A14B, f"{A14B}_gate_override", "wan22_a14b_lora_moe_comparison_sheet",
                                                   "wan22_i2v_a14b_lora_moe", "wan22_ti2v_5b_lora_moe"])
    for name, wf in session["workflows"].items():
        assert wf["missing"] == [], f"{name}: missing node types {wf['missing']}"
        assert all(n["registered"] for n in wf["nodes"]), name
        assert len(wf["nodes"]) == wf["count"], name
        assert not [d for d in wf["dialogs"] if "missing" in d.lower()], f"{name}: {wf['dialogs']}"
        assert unexpected(wf["errors"]) == [], f"{name}: {wf['errors']}"
        pack_nodes = [n for n in wf["nodes"] if n["type"].startswith("WanLoRAMoE_")]
        assert pack_nodes, name
    assert (H.ARTIFACTS / f"{A14B}.png").stat().st_size > 20_000


def test_converter_agrees_with_the_front_end(session, server):
    """moe_core/workflow_api.py gives the prompt the front end itself would queue (graphToPrompt), for the bundled
    workflows and for ComfyUI's own A14B template (bypassed groups, notes, control_after_generate)."""
    info = server.object_info()
    cases = {name: (H.load_workflow(name), wf["output"]) for name, wf in session["workflows"].items()}
    cases[CORE_TEMPLATE] = (session["core_template"]["json"], session["core_template"]["output"])
    for name, (workflow, front_end) in cases.items():
        ours = ui_to_api.strip_meta(ui_to_api.convert(workflow, info))
        theirs = ui_to_api.strip_meta(front_end)
        assert ours == theirs, f"{name}: converter differs from graphToPrompt"


def test_band_preview_follows_the_widgets(session):
    assert session["band_initial"]["levels"] == [[0.2, 0.5], [0.6, 1.0]]
    assert session["band_edited"]["levels"] == [[0.45, 0.5], [0.6, 1.0]]
    assert session["band_edited"]["image"] != session["band_initial"]["image"], "the picture must redraw"
    assert "start <= mid" in session["band_invalid"]["error"]


def test_band_preview_draws_the_files_pair_boundary_before_a_run(session):
    """Before a run the band's dotted high/low-noise line comes from the LoRA-MoE file upstream: the I2V pair
    switches at t = 0.9, T2V at 0.875, and the single TI2V 5B DiT has none."""
    seen = session["band_boundary_before_run"]
    assert seen[A14B]["boundaries"] == [0.875, 0.875]
    assert seen[I2V]["boundaries"] == [0.9, 0.9]
    assert seen[TI2V]["boundaries"] == [None]


def test_router_shows_detection_before_and_after_running(session):
    assert "Hook/Electrocautery" in session["router_preview"] and "Suction" in session["router_preview"]
    assert session["run_history"]["status"]["status_str"] == "success"
    after = session["router_after_run"]
    assert "instruments: Hook/Electrocautery, Suction" in after and "Hook/Electrocautery0.50" in after.replace(" ", "").replace("\n", "")
    band = session["band_after_run"]
    assert band["experts"] == ["Scissors", "Hook/Electrocautery", "Suction", "Other"] and band["rawVsT"]
    assert unexpected(session["final_errors"]) == [], "\n".join(session["final_errors"])
    assert (H.ARTIFACTS / f"{A14B}_after_run.png").exists()
