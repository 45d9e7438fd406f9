"""``python -m clip_med.export checkpoint=<checkpoint or run folder> out=<folder>``: the hub's open_clip layout.

Writes safetensors weights (LoRA adapters merged), an open_clip config and a Hugging Face text
tower's tokenizer files, then checks that plain open_clip loads the folder back (``local-dir:``) with
the same weights, tokens and embeddings (see clip_med.modeling.export). Uploaded as a hub repo, the
folder loads with ``hf-hub:<org>/<repo>``.
"""

from __future__ import annotations

import logging

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from clip_med.cli.common import command
from clip_med.cli.config import register_schemas, setup_logging, to_object
from clip_med.modeling.export import INFO, ExportConfig, export_checkpoint

log = logging.getLogger("clip_med.export")

ConfigStore.instance().store(name="export_schema", node=ExportConfig)
register_schemas()


@command("export")
def main(cfg: DictConfig) -> None:
    setup_logging()
    out = export_checkpoint(to_object(cfg))
    print(f"exported to {out}")
    print((out / INFO).read_text(encoding="utf-8"))


if __name__ == "__main__":
    main()
