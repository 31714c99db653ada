"""Optional LPIPS between a frame and its flow-warped predecessor, from weights the user supplies.

The ``lpips`` package ships its small linear calibration layers but fetches the backbone (AlexNet, VGG16 or
SqueezeNet ImageNet weights) from the internet when built normally. Here the backbone is built untrained
(``pnet_rand=True``, nothing downloaded) and its weights are loaded from a local file the user gives: a
torchvision state dict (``features.N.*`` keys, e.g. ``alexnet-owt-7be5be79.pth``) or an LPIPS trunk state dict
(``sliceK.N.*``). Asking for LPIPS without the package or without that file is an error, never a silent skip.
"""
from __future__ import annotations

import os
import warnings

import numpy as np

from .features import check_model_file
from .videos import EvalInputError

LPIPS_NETS = ("alex", "vgg", "squeeze")


class LpipsMetric:
    """``(target, warped)`` uint8 RGB ``[H, W, 3]`` -> LPIPS distance map ``[H, W]`` (spatial LPIPS v0.1)."""

    def __init__(self, backbone: str | os.PathLike | None, sha256: str | None = None, net: str = "alex",
                 device: str = "cpu"):
        import torch

        if net not in LPIPS_NETS:
            raise EvalInputError(f"LPIPS: net must be one of {LPIPS_NETS}, not {net!r}")
        if backbone is None:
            raise EvalInputError("LPIPS was requested but no backbone weights were given (--lpips-backbone: a local "
                                 f"torchvision {net} state dict; nothing is downloaded)")
        path = check_model_file(backbone, sha256, f"LPIPS {net} backbone")
        try:
            import lpips
        except ImportError:
            raise EvalInputError("LPIPS was requested but the `lpips` package is not installed "
                                 "(pip install lpips)") from None
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise EvalInputError(f"LPIPS backbone {path}: not a loadable state dict ({exc})") from None
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torchvision's deprecation notice for `pretrained=False`
            model = lpips.LPIPS(net=net, pnet_rand=True, spatial=True, verbose=False)
        slice_of = {idx: name for name, seq in model.net.named_children() for idx in seq._modules}
        mapped = {}
        for key, value in state.items():
            parts = key.split(".")
            if parts[0] == "features" and len(parts) >= 3 and parts[1] in slice_of:
                mapped[f"{slice_of[parts[1]]}.{parts[1]}.{'.'.join(parts[2:])}"] = value
            elif parts[0].startswith("slice"):
                mapped[key] = value
        try:
            model.net.load_state_dict(mapped, strict=True)
        except RuntimeError as exc:
            raise EvalInputError(f"LPIPS backbone {path}: does not fit the {net} trunk "
                                 f"({str(exc).splitlines()[0]}); give torchvision {net} weights") from None
        self.model = model.to(device).eval()
        self.device, self.net, self.path = device, net, path

    def __call__(self, target: np.ndarray, warped: np.ndarray) -> np.ndarray:
        import torch

        def tensor(img: np.ndarray):
            return torch.from_numpy(np.ascontiguousarray(img)).to(self.device).permute(2, 0, 1)[None].float() / 127.5 - 1

        with torch.no_grad():
            dist = self.model(tensor(target), tensor(warped))
        return dist[0, 0].double().cpu().numpy()


__all__ = ["LPIPS_NETS", "LpipsMetric"]
