"""Stage 1 end to end: the LoRA it writes is a standard ComfyUI LoRA (LoraLoaderModelOnly's code path gives the
trained model's forward) and the base of a LoRA-MoE; bad inputs get clear messages and lose nothing."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

import comfy.model_management
import comfy.sd
import comfy.utils

import train_fixtures as tf
from training import stage1
from training.stage1 import run_stage1

QUIET = lambda *_: None  # noqa: E731


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run fastest on one thread


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> tf.Workspace:
    return tf.make_workspace(tmp_path_factory.mktemp("stage1_ws"))


@pytest.fixture(scope="module")
def trained(ws, tmp_path_factory):
    """A finished stage-1 run (a few steps with a high learning rate, so the LoRA is far from zero)."""
    out = tmp_path_factory.mktemp("stage1_run") / "out"
    cfg = tf.stage1_config(ws, out, train={"max_steps": 5, "learning_rate": 2e-2},
                           output={"save_every": 2, "plot": True})
    return run_stage1(cfg, log_fn=QUIET)


def _inputs():
    g = torch.Generator().manual_seed(11)
    return torch.randn(2, 16, 3, 4, 6, generator=g), torch.tensor([0.35, 0.8]), torch.randn(2, 8, 4096, generator=g)


def _apply(mp, x, t, ctx):
    comfy.model_management.load_models_gpu([mp])
    opts = dict(mp.model_options["transformer_options"])
    opts["wrappers"] = mp.wrappers  # as ComfyUI's sampler passes them
    with torch.no_grad():
        return mp.model.apply_model(x, t, c_crossattn=ctx, transformer_options=opts)


def test_outputs_and_lora_loads_in_comfyui_like_the_trained_model(ws, trained):
    out = trained.out_dir
    assert (out / "lora.safetensors").is_file() and (out / "loss.png").is_file()
    assert (out / "metrics.jsonl").is_file() and (out / "config.toml").is_file()
    assert json.loads((out / "checkpoints" / "latest.json").read_text())["weights"] == "final.safetensors"
    with open(out / "loss.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"

    x, t, ctx = _inputs()
    # oracle: the training forward (fused LoRA-MoE path) with the trained adapters
    dit = trained.trainer.dits.dits[0]
    dit.activate()
    gains = torch.zeros(2, 5)
    gains[:, 0] = 1.0
    with torch.no_grad(), dit.adapters(gains):
        v_train = dit.predict(x, t, ctx)
    dit.release()
    denoised_train = x - t.reshape(-1, 1, 1, 1, 1) * v_train

    # ComfyUI's own UNETLoader and LoraLoaderModelOnly nodes, with the files in its model folders
    import folder_paths
    import nodes as comfy_nodes  # ComfyUI's nodes.py (ComfyUI's root is first on sys.path)

    added = [("diffusion_models", str(ws.dit.parent)), ("loras", str(trained.out_dir))]
    for kind, folder in added:
        folder_paths.add_model_folder_path(kind, folder)
    try:
        model = comfy_nodes.UNETLoader().load_unet(ws.dit.name, "default")[0]
        patched = comfy_nodes.LoraLoaderModelOnly().load_lora_model_only(model, trained.loras["default"].name, 1.0)[0]
    finally:
        for kind, folder in added:
            folder_paths.folder_names_and_paths[kind][0].remove(folder)
            folder_paths.filename_list_cache.pop(kind, None)
    assert len(patched.patches) == len(dit.bank.names) == 17  # every LoRA key was recognised
    via_loader = _apply(patched, x, t, ctx)
    plain = _apply(comfy.sd.load_diffusion_model(str(ws.dit)), x, t, ctx)
    assert (via_loader - plain).abs().max() > 1e-3, "the trained LoRA must change the output"
    torch.testing.assert_close(via_loader, denoised_train, atol=2e-5, rtol=1e-5)


def test_stage1_lora_is_the_base_of_a_lora_moe(ws, trained, tmp_path):
    from moe_core import assemble
    from moe_core.checkpoint import Adapter, load_lora_moe, save_lora_moe
    from moe_core.lora_formats import load_lora
    from moe_core.patch import apply_lora_moe

    x, t, ctx = _inputs()
    model = comfy.sd.load_diffusion_model(str(ws.dit))
    lora_sd = comfy.utils.load_torch_file(str(trained.loras["default"]))
    reference = _apply(comfy.sd.load_lora_for_models(model, None, lora_sd, 1.0, 0.0)[0], x, t, ctx)  # LoraLoader

    # moe_core reads the file (ComfyUI key format) back exactly
    adapters = load_lora(trained.loras["default"])
    for d in trained.trainer.dits:
        for name, ad in d.bank.base_lora().items():
            assert torch.equal(adapters[name].down, ad.down) and torch.equal(adapters[name].up, ad.up)

    # a LoRA-MoE with the stage-1 LoRA as its base and random experts (routing off -> base only)
    moe = assemble.assemble({"default": trained.loras["default"]}, {}, ["Scissors", "Hook/Electrocautery",
                                                                       "Suction", "Other"])
    g = torch.Generator().manual_seed(0)
    for proj in moe.sets["default"].modules.values():
        proj.experts = [Adapter(torch.randn(4, proj.in_features, generator=g) * 0.05,
                                torch.randn(proj.out_features, 4, generator=g) * 0.05, 4.0) for _ in range(4)]
    path = save_lora_moe(moe, tmp_path / "moe.safetensors")
    moe = load_lora_moe(path)
    # the stage-1 LoRA records its DiT, so the assembled file knows the depth and width it fits
    assert moe.sets["default"].model == {"dim": 128, "num_layers": tf.LAYERS, "ffn_dim": 256, "in_dim": 16,
                                         "out_dim": 16, "family": "t2v"}
    ours = _apply(apply_lora_moe(comfy.sd.load_diffusion_model(str(ws.dit)), moe, alpha_base=1.0, routing=None),
                  x, t, ctx)
    torch.testing.assert_close(ours, reference, atol=2e-5, rtol=1e-5)

    # the trainer's own LoRA-MoE checkpoint loads the same way
    ck = load_lora_moe(trained.out_dir / "checkpoints" / "final.safetensors")
    ours = _apply(apply_lora_moe(comfy.sd.load_diffusion_model(str(ws.dit)), ck, alpha_base=1.0), x, t, ctx)
    torch.testing.assert_close(ours, reference, atol=2e-5, rtol=1e-5)


def _snapshot(*folders: Path) -> dict[str, str]:
    out = {}
    for folder in folders:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _manifest(ws: tf.Workspace, path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_bad_inputs_get_clear_messages_and_nothing_is_lost(ws, trained, tmp_path, capsys):
    from training.data.manifest import ManifestError
    from training.encoders import NoUsableClipsError
    from training.models import ModelFileError

    before = _snapshot(ws.cache, trained.out_dir)
    good = [json.loads(x) for x in ws.manifest.read_text(encoding="utf-8").splitlines()]
    clips = ws.manifest.parent
    out = trained.out_dir

    def cfg(**sections):
        return tf.stage1_config(ws, out, **sections)

    # a new run into a folder that holds one is refused (its results would be overwritten)
    with pytest.raises(stage1.TrainingSetupError, match="already holds a run"):
        run_stage1(cfg(), log_fn=QUIET)

    # wrong model files, named in the message, found before any encoding
    vae_like = tmp_path / "vae.safetensors"
    from safetensors.torch import save_file

    save_file({"encoder.conv1.weight": torch.zeros(2, 2), "decoder.conv1.weight": torch.zeros(2, 2)}, str(vae_like))
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(ws.dit.read_bytes()[:5000])
    for path, needle in ((vae_like, "looks like a VAE"), (truncated, "not a readable safetensors"),
                         (tmp_path / "missing.safetensors", "not found")):
        with pytest.raises(ModelFileError, match=needle) as e:
            run_stage1(cfg(model={"dit": str(path)}), resume="auto", log_fn=QUIET)
        assert str(path.name) in str(e.value)

    # a clip that is missing: the manifest line and file are named
    missing = _manifest(ws, clips / "missing.jsonl", good[:1] + [{**good[1], "video_path": "clips/nope.mp4"}])
    with pytest.raises(ManifestError, match=r"missing.jsonl:2: field 'video_path': file not found"):
        run_stage1(cfg(data={"manifest": str(missing)}), resume="auto", log_fn=QUIET)

    # empty manifest
    empty = _manifest(ws, clips / "empty.jsonl", [])
    with pytest.raises(ManifestError, match="manifest is empty"):
        run_stage1(cfg(data={"manifest": str(empty)}), resume="auto", log_fn=QUIET)

    # corrupt clips: skipped and reported; if none is left, a clear error
    bad_clip = clips / "clips" / "corrupt.mp4"
    bad_clip.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 100)
    corrupt = _manifest(ws, clips / "corrupt.jsonl", [{"video_path": "clips/corrupt.mp4", "caption": "电凝钩切割组织。",
                                                       "duration": 1.0, "source": "t"}])
    with pytest.raises(NoUsableClipsError, match=r"(?s)every clip was skipped.*corrupt.mp4"):
        run_stage1(cfg(data={"manifest": str(corrupt)}), resume="auto", log_fn=QUIET)
    from training.encoders import prepare

    mixed = _manifest(ws, clips / "mixed.jsonl", good + [json.loads(corrupt.read_text())])
    prepared = prepare(cfg(data={"manifest": str(mixed)}).data)
    assert len(prepared.dataset) == len(good) and [n for n, _ in prepared.cache.skipped] == ["clips/corrupt.mp4"]

    # a caption naming no instrument: reported by name (policy error), or skipped, or sent to "Other"
    from training.data.labels import NoInstrumentError

    no_inst = _manifest(ws, clips / "noinst.jsonl", good[:1] + [{**good[1], "caption": "腹腔镜下观察腹腔，未见出血。"}])
    with pytest.raises(NoInstrumentError, match="clips/hook_00.mp4"):
        run_stage1(cfg(data={"manifest": str(no_inst), "no_instrument": "error"}), resume="auto", log_fn=QUIET)
    skipped = prepare(cfg(data={"manifest": str(no_inst), "no_instrument": "skip"}).data)
    assert len(skipped.dataset) == 1 and skipped.labels.skipped == ["clips/hook_00.mp4"]

    # a bad config key through the command line: exit code 2 and the valid keys listed
    bad_cfg = tmp_path / "bad.toml"
    bad_cfg.write_text("[train]\nlearning_rat = 1e-4\n", encoding="utf-8")
    capsys.readouterr()
    assert stage1.main(["--config", str(bad_cfg)]) == 2
    err = capsys.readouterr().err
    assert "unknown key(s) train.learning_rat" in err and "learning_rate" in err
    assert stage1.main(["--config", str(bad_cfg), "--train.learning_rat", "1"]) == 2
    assert stage1.main(["--print-config", "--set", "train.max_steps=3"]) == 0
    assert "max_steps = 3" in capsys.readouterr().out

    # the cache and the earlier run's results are untouched by all of the above
    after = _snapshot(ws.cache, trained.out_dir)
    assert {k: v for k, v in after.items() if k in before} == before


def test_demo_config_runs(tmp_path):
    """The demo's path (assets, cache, training, outputs), with the pooling VAE stand-in to keep it fast."""
    from training.config import demo_config

    work = tmp_path / "demo"
    cfg = demo_config([f"demo.work_dir={work}", f"data.cache_dir={work / 'cache'}", f"output.dir={work / 'run'}",
                       "data.vae=demo:pooling", "train.max_steps=3", "output.progress=false"])
    result = run_stage1(cfg, log_fn=QUIET)
    assert result.steps == 3 and result.loras["default"].is_file() and result.plots[0].is_file()
    assert (work / "models" / "tiny_wan_t2v_4x128.safetensors").is_file()
    assert len(list((work / "data" / "clips").glob("*.mp4"))) == 4
    assert result.data.cache.computed == 4
    first = tf.lora_tensors(result.loras["default"])
    again = run_stage1(cfg, log_fn=QUIET)  # the demo may be re-run: it starts again in its own folder
    assert again.steps == 3 and again.data.cache.computed == 0 and again.data.cache.reused == 4  # cache reused
    for k, v in tf.lora_tensors(again.loras["default"]).items():  # same seed, same data: the same LoRA
        assert torch.equal(v, first[k])


def _as_musubi(src: dict[str, torch.Tensor], drop: str) -> tuple[dict[str, torch.Tensor], int]:
    """A ComfyUI-format LoRA rewritten with musubi-tuner/kohya keys and alpha = rank / 2, one module left out."""
    out, kept = {}, set()
    for key, value in src.items():
        part = next(x for x in (".lora_down.weight", ".lora_up.weight", ".alpha") if key.endswith(x))
        module = key[len("diffusion_model."):-len(part)]
        if module == drop:
            continue
        kept.add(module)
        rank = src[f"diffusion_model.{module}.lora_down.weight"].shape[0]
        out["lora_unet_" + module.replace(".", "_") + part] = (torch.tensor(rank / 2.0) if part == ".alpha"
                                                               else value.to(torch.bfloat16).float())
    return out, len(kept)


def test_stage1_starts_from_an_existing_musubi_lora(ws, trained, tmp_path):
    """lora.init_weights: the first forward is exactly that of ComfyUI's LoRA loader with the file (the oracle),
    musubi keys and alphas included; files that do not fit the targets are refused with the reason."""
    from safetensors.torch import save_file

    from training.adapters import AdapterConfigError
    from training.stage1 import setup_stage1

    drop = "blocks.2.ffn.0"
    musubi, kept = _as_musubi(tf.lora_tensors(trained.loras["default"]), drop)
    path = tmp_path / "musubi_lora.safetensors"
    save_file(musubi, str(path))
    setup = setup_stage1(tf.stage1_config(ws, tmp_path / "cont", lora={"init_weights": str(path)}), log_fn=QUIET)
    dit = setup.trainer.dits.dits[0]
    assert kept == len(dit.bank.names) - 1
    fresh = dit.bank.projections[dit.bank.names.index(drop)].slot(0)
    assert float(fresh.up.detach().abs().max()) == 0.0  # not in the file: starts fresh, ΔW = 0
    x, t, ctx = _inputs()
    gains = torch.zeros(2, 5)
    gains[:, 0] = 1.0
    with torch.no_grad(), dit.adapters(gains):
        denoised_train = x - t.reshape(-1, 1, 1, 1, 1) * dit.predict(x, t, ctx)
    dit.release()
    model = comfy.sd.load_diffusion_model(str(ws.dit))
    oracle = _apply(comfy.sd.load_lora_for_models(model, None, comfy.utils.load_torch_file(str(path)), 1.0, 0.0)[0],
                    x, t, ctx)
    plain = _apply(comfy.sd.load_diffusion_model(str(ws.dit)), x, t, ctx)
    assert (oracle - plain).abs().max() > 1e-3
    torch.testing.assert_close(denoised_train, oracle, atol=2e-5, rtol=1e-5)
    assert setup.trainer.train_step()["loss"] > 0  # and it trains on from there

    # A14B: one DiT from the file, the other fresh
    pair = setup_stage1(tf.stage1_config(ws, tmp_path / "pair", pair=True, lora={"init_weights_high": str(path)}),
                        log_fn=QUIET)
    high, low = (pair.trainer.dits.by_name(n).bank for n in ("high_noise", "low_noise"))
    q = high.projections[high.names.index("blocks.1.self_attn.q")].slot(0)
    assert torch.equal(q.up, musubi["lora_unet_blocks_1_self_attn_q.lora_up.weight"]) and q.alpha == 4.0
    assert all(float(p.detach().abs().max()) == 0 for n, p in low.named_trainable() if n.endswith(".up"))

    for lora, needle in (({"rank_q": 4}, r"blocks.1.self_attn.q: rank 8 in the file, 4 configured \(lora.rank_q = 8"),
                         ({"target_blocks": 1}, r"adapts 8 module\(s\) the config does not train, e.g. blocks.1"),
                         ({"init_weights": str(ws.dit)}, r"lora.init_weights: .*tiny_high.safetensors: key .* is not a LoRA down/up/alpha tensor"),
                         ({"init_weights": str(tmp_path / "nope.safetensors")}, "file not found")):
        with pytest.raises(AdapterConfigError, match=needle):
            setup_stage1(tf.stage1_config(ws, tmp_path / "bad", lora={"init_weights": str(path), **lora}),
                         log_fn=QUIET)
