// ComfyUI front-end extension of the WAN LoRA-MoE pack.
// Uses only the front end's public extension API (app.registerExtension, node lifecycle hooks,
// addDOMWidget, api.fetchApi) through the documented /scripts/app.js and /scripts/api.js entry points.
//  - Prompt→Instrument Router: previews the instruments it will detect while you type, and shows the
//    detected instruments and gates after it runs.
//  - Gate Override / Load LoRA-MoE: show their resulting gates / summary after they run.
//  - Timestep Band: draws the gate schedule (band, and each expert's gate after a run) live while the
//    band widgets are edited.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { drawSchedule, presetBand } from "./schedule.js";

const PACK = "WanLoRAMoE";
const ROUTER = `${PACK}_PromptRouter`;
const OVERRIDE = `${PACK}_GateOverride`;
const LOADER = `${PACK}_LoadLoRAMoE`;
const BAND = `${PACK}_TimestepBand`;
const COLOURS = ["#e6553c", "#3c8ce6", "#46b45a", "#be78dc", "#f0b428", "#28bebe"];

function chain(proto, name, fn) {
  const previous = proto[name];
  proto[name] = function (...args) {
    const r = previous?.apply(this, args);
    fn.apply(this, args);
    return r;
  };
}

function widget(node, name) {
  return node.widgets?.find((w) => w.name === name);
}

/** Call `fn` after any of the node's widgets changes (wraps their callbacks once). */
function onWidgetsChanged(node, fn) {
  for (const w of node.widgets ?? []) {
    if (w.wlmWrapped) continue;
    const cb = w.callback;
    w.callback = function (...args) {
      const r = cb?.apply(this, args);
      fn(w);
      return r;
    };
    w.wlmWrapped = true;
  }
}

/** A read-only panel (DOM widget) at the bottom of the node; not saved in the workflow or the prompt. */
function addPanel(node, name, minHeight) {
  const el = document.createElement("div");
  el.className = "wlm-panel";
  Object.assign(el.style, {
    font: "11px sans-serif", color: "#ddd", background: "rgba(0,0,0,0.25)", borderRadius: "4px",
    padding: "4px 6px", overflow: "hidden", boxSizing: "border-box", whiteSpace: "normal",
  });
  const w = node.addDOMWidget(name, "wlm_panel", el, { serialize: false, hideOnZoom: false, getMinHeight: () => minHeight });
  w.serialize = false;
  return el;
}

function renderGates(el, info) {
  el.replaceChildren();
  const head = document.createElement("div");
  head.textContent = info.line ?? info.routing_error ?? "";
  head.style.marginBottom = "3px";
  if (info.routing_error) head.style.color = "#ff8080";
  el.append(head);
  Object.entries(info.gates ?? {}).forEach(([name, g], i) => {
    const row = document.createElement("div");
    row.style.display = "flex";
    row.style.alignItems = "center";
    row.style.gap = "4px";
    const label = document.createElement("span");
    label.textContent = name;
    label.style.width = "120px";
    label.style.flex = "none";
    const bar = document.createElement("span");
    Object.assign(bar.style, {
      height: "6px", width: `${Math.round(100 * Math.max(0, Math.min(1, g)))}px`,
      background: COLOURS[i % COLOURS.length], display: "inline-block",
    });
    const value = document.createElement("span");
    value.textContent = g.toFixed(2);
    row.append(label, bar, value);
    el.append(row);
  });
}

/** The Router's prompt: its own widget, or the text of the node its prompt input is connected to
 *  (e.g. a String (Multiline) node shared with the text encoder); null if that cannot be read. */
function promptText(node) {
  const slot = node.findInputSlot?.("prompt") ?? -1;
  if (slot >= 0 && node.inputs[slot]?.link != null) {
    const source = node.getInputNode(slot);
    const w = source?.widgets?.find((x) => ["value", "text", "string", "prompt"].includes(x.name));
    return typeof w?.value === "string" ? w.value : null;
  }
  return widget(node, "prompt")?.value ?? "";
}

function setupRouter(node) {
  const el = addPanel(node, "wlm_detected", 90);
  el.textContent = "type a prompt: the instruments it names are shown here";
  let timer = null;
  const preview = async () => {
    const source = widget(node, "route_from")?.value ?? "prompt";
    if (source === "image") {
      el.textContent = "route_from is image: the gates come from the start image's classifier; run the graph to see them";
      return;
    }
    const text = promptText(node);
    if (text === null) {
      el.textContent = "the prompt comes from another node: run the graph to see what was detected";
      return;
    }
    const query = {
      prompt: text,
      top_k: widget(node, "top_k")?.value ?? 2,
      temperature: widget(node, "temperature")?.value ?? 1,
      no_instrument: widget(node, "no_instrument")?.value ?? "Other",
    };
    try {
      const res = await api.fetchApi("/wan_lora_moe/route", {
        method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(query),
      });
      const info = await res.json();
      const label = source === "prompt" ? "preview" : "preview of the prompt's half (the image's comes when it runs)";
      if (res.ok) renderGates(el, { ...info, line: info.line && `${label}: ${info.line}` });
    } catch (e) {
      el.textContent = `preview unavailable: ${e}`;
    }
  };
  node.wlmPreview = () => {
    clearTimeout(timer);
    timer = setTimeout(preview, 250);
  };
  onWidgetsChanged(node, node.wlmPreview);
  node.wlmPanel = el;
}

// The pair boundary a band's LoRA-MoE file records (its high-noise set's sigma range starts there: T2V 0.875,
// I2V 0.9), so the preview draws the right split before a run; null for a single-DiT file (TI2V 5B), undefined
// while unknown. Found by walking the band's model input up to a Load LoRA-MoE node.
const fileBoundaries = new Map();

function upstreamLoader(node) {
  let cur = node;
  for (let hops = 0; cur && hops < 8; hops++) {
    const slot = cur.inputs?.findIndex((i) => i.type === "MODEL") ?? -1;
    cur = slot >= 0 ? cur.getInputNode?.(slot) : null;
    if (cur?.comfyClass === LOADER) return cur;
  }
  return null;
}

function recordedBoundary(node) {
  const loader = upstreamLoader(node);
  const w = loader ? widget(loader, "lora_moe") : null;
  const name = w?.value;
  const listed = w?.options?.values;  // a file this server does not have: nothing to ask (no 404 in the console)
  if (!name || (Array.isArray(listed) && !listed.includes(name))) return undefined;
  if (!fileBoundaries.has(name)) {
    fileBoundaries.set(name, undefined);
    api.fetchApi(`/wan_lora_moe/file_info?name=${encodeURIComponent(name)}`)
      .then((res) => (res.ok ? res.json() : null))
      .then((info) => {
        if (!info) return;
        const sets = info.sets ?? {};
        const high = sets.high_noise?.sigma_range;
        const family = Object.values(sets).map((s) => s.model?.family).find((f) => f);
        fileBoundaries.set(name, high ? high[0] : family === "ti2v" ? null : family === "i2v" ? 0.9 : 0.875);
        node.wlmRedraw?.();
      })
      .catch(() => {});
  }
  return fileBoundaries.get(name);
}

function setupBand(node) {
  const canvas = document.createElement("canvas");
  canvas.className = "wlm-schedule";
  Object.assign(canvas.style, { width: "100%", height: "150px", display: "block" });
  const w = node.addDOMWidget("wlm_schedule", "wlm_schedule", canvas, {
    serialize: false, hideOnZoom: false, getMinHeight: () => 155,
  });
  w.serialize = false;
  node.wlmCanvas = canvas;
  node.wlmRedraw = () => {
    // Size in graph units (the DOM widget is scaled with the canvas zoom by the front end).
    const width = Math.max(240, Math.round((node.size?.[0] ?? 380) - 20));
    const height = 150;
    if (canvas.width !== width) canvas.width = width;
    if (canvas.height !== height) canvas.height = height;
    const ctx = canvas.getContext("2d");
    const v = (name, d) => widget(node, name)?.value ?? d;
    const last = node.wlmSchedule;
    const fileBoundary = last ? undefined : recordedBoundary(node);
    let data;
    try {
      const levels = presetBand(v("preset", "three-level"), {
        start: v("start", 0.2), mid: v("mid", 0.6), mid_factor: v("mid_factor", 0.5), end: v("end", 1.0),
      }, v("preset") === "file default" && last ? last.band : null);
      data = {
        levels, steps: Math.max(1, Math.round(v("preview_steps", 20))), shift: v("preview_shift", 8.0),
        experts: last?.experts, rawVsT: last?.raw_vs_t, emaBeta: last?.ema_beta, boundary: last ? last.boundary : fileBoundary === undefined ? 0.875 : fileBoundary,
      };
    } catch (e) {
      data = { error: String(e.message ?? e) };
    }
    drawSchedule(ctx, width, height, data);
    node.wlmDrawn = data;
  };
  onWidgetsChanged(node, () => node.wlmRedraw());
  requestAnimationFrame(() => node.wlmRedraw());
}

app.registerExtension({
  name: "WanLoRAMoE.UI",

  async beforeRegisterNodeDef(nodeType, nodeData) {
    const proto = nodeType.prototype;
    if (nodeData.name === ROUTER) {
      chain(proto, "onNodeCreated", function () { setupRouter(this); });
      chain(proto, "onConfigure", function () { this.wlmPreview?.(); });
      // A connected prompt can change on another node: re-preview when the text differs (cheap check per frame).
      chain(proto, "onDrawForeground", function () {
        const text = promptText(this);
        if (text !== this.wlmLastPrompt) {
          this.wlmLastPrompt = text;
          this.wlmPreview?.();
        }
      });
      chain(proto, "onExecuted", function (output) {
        const info = output?.wlm_routing?.[0];
        if (info && this.wlmPanel) {
          this.wlmLastPrompt = promptText(this);
          renderGates(this.wlmPanel, info);
        }
      });
    } else if (nodeData.name === OVERRIDE || nodeData.name === LOADER) {
      chain(proto, "onNodeCreated", function () {
        this.wlmPanel = addPanel(this, "wlm_summary", nodeData.name === OVERRIDE ? 80 : 40);
        this.wlmPanel.textContent = "run the graph to see the result here";
      });
      chain(proto, "onExecuted", function (output) {
        const info = output?.wlm_routing?.[0];
        if (!this.wlmPanel) return;
        if (info) renderGates(this.wlmPanel, info);
        else if (output?.text?.[0]) this.wlmPanel.textContent = output.text[0];
      });
    } else if (nodeData.name === BAND) {
      chain(proto, "onNodeCreated", function () { setupBand(this); });
      chain(proto, "onConfigure", function () { requestAnimationFrame(() => this.wlmRedraw?.()); });
      chain(proto, "onResize", function () { this.wlmRedraw?.(); });
      chain(proto, "onExecuted", function (output) {
        const data = output?.wlm_schedule?.[0];
        if (data) {
          this.wlmSchedule = data;
          this.wlmRedraw?.();
        }
      });
    }
  },
});
