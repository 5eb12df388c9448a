"""Cog's ``train()`` on every process of a ``torchrun`` job, with prior preservation and generated class images, for
tests/test_multiprocess_train.py. Each process writes ``<probe_dir>/rank<N>.json`` with what it saw: the folders it
trained from, the preprocessing calls it made (and on which device), the class images it rendered, the size of its
class dataset and the tar path train() returned.

    torchrun --standalone --nproc_per_node 2 tests/multiprocess_train_job.py PHOTOS PROBE_DIR NUM_CLASS_IMAGES
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("COG_SDXL_CACHE", str(ROOT / ".cache"))
os.environ.setdefault("SDXL_MODEL", "tiny")

import preprocess  # noqa: E402
import train  # noqa: E402
from pti.training import trainer as trainer_module  # noqa: E402


def main(photos: Path, probe_dir: Path, num_class_images: int) -> None:
    seen: dict = {"preprocess_devices": [], "class_indices": []}
    real_preprocess = preprocess.preprocess

    def recording_preprocess(input_images, output_dir, settings):
        seen["preprocess_devices"].append(settings.device)
        return real_preprocess(input_images, output_dir, settings)

    real_indices = trainer_module.class_image_indices

    def recording_indices(missing, rank, processes):
        indices = real_indices(missing, rank, processes)
        seen["class_indices"] += indices
        return indices

    real_create = trainer_module.Trainer.__dict__["create"]

    def recording_create(cls, settings):
        trainer = real_create.__func__(cls, settings)
        seen.update(rank=trainer.accelerator.process_index, num_processes=trainer.accelerator.num_processes,
                    dataset_dir=str(settings.dataset_dir), class_data_dir=str(settings.class_data_dir),
                    class_dataset_size=len(trainer.class_dataset))
        return trainer

    preprocess.preprocess = recording_preprocess
    trainer_module.class_image_indices = recording_indices
    trainer_module.Trainer.create = classmethod(recording_create)
    output = train.train(input_images=photos, seed=11, resolution=64, train_batch_size=1, max_train_steps=2,
                         lora_rank=4, lr_warmup_steps=0, captioning_model="", validation_prompts="",
                         class_prompt="a photo of a dog", num_class_images=num_class_images,
                         validation_num_inference_steps=2, verbose=False)
    tar = Path(output.weights)
    seen.update(tar=str(tar), tar_exists=tar.is_file())
    probe_dir.mkdir(parents=True, exist_ok=True)
    (probe_dir / f"rank{seen['rank']}.json").write_text(json.dumps(seen, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]))
