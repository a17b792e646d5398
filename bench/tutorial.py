"""The PyTorch transfer-learning tutorial's loop, the baseline vggcache is measured against (`make bench` row 4,
and the fine-tuning table of bench/finetune.py).

Full torchvision vgg16 with our body, every layer frozen but a new last linear layer, SGD (lr 1e-3, momentum 0.9,
StepLR 7 x 0.1), batch 4, 4 workers, NCHW fp32, the tutorial's transforms: every epoch runs every training image
through the whole network (random resized crop + flip) and every validation image (resize 256, centre crop 224).
The shared weights file holds the convolutional body only, so fc6 and fc7 keep torchvision's random initialisation
(frozen, as the tutorial freezes them): a handicap for this baseline's accuracy, not for its speed.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from pipeline.backbone.vgg16 import vgg16_features


def transforms():
    from torchvision import transforms as T

    norm = T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    return {"train": T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor(), norm]),
            "val": T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), norm])}


def model_and_optimizer(weights: str, n_classes: int, device):
    from torch import nn
    from torchvision.models import vgg16

    model = vgg16(weights=None)
    model.features = vgg16_features(weights)
    for p in model.parameters():
        p.requires_grad = False
    model.classifier[6] = nn.Linear(4096, n_classes)
    model = model.to(device)
    optimizer = torch.optim.SGD(model.classifier[6].parameters(), lr=0.001, momentum=0.9)
    return model, optimizer, torch.optim.lr_scheduler.StepLR(optimizer, step_size=7, gamma=0.1)


def loader(folder, phase: str, indices=None):
    subset = folder if indices is None else torch.utils.data.Subset(folder, indices)
    return torch.utils.data.DataLoader(subset, batch_size=4, shuffle=phase == "train", num_workers=4)


def run_phase(model, optimizer, batches, phase: str, device, stop_at: float = float("inf")) -> tuple[int, int]:
    """One pass: (images, correct). Stops early, mid-phase, once time.perf_counter() passes `stop_at`."""
    from torch import nn

    model.train(phase == "train")
    seen = correct = 0
    for inputs, labels in batches:
        inputs, labels = inputs.to(device), labels.to(device)
        optimizer.zero_grad()
        with torch.set_grad_enabled(phase == "train"):
            logits = model(inputs)
            loss = nn.functional.cross_entropy(logits, labels)
            if phase == "train":
                loss.backward()
                optimizer.step()
        seen += len(labels)
        correct += int((logits.argmax(1) == labels).sum())
        if time.perf_counter() > stop_at:
            break
    return seen, correct


def fit(data: Path, weights: str, epochs: int, device="cpu") -> dict:
    """The tutorial's training: `epochs` epochs of train then val; the best validation accuracy and the time."""
    from torchvision import datasets

    tf = transforms()
    folders = {phase: datasets.ImageFolder(Path(data) / phase, tf[phase]) for phase in ("train", "val")}
    model, optimizer, scheduler = model_and_optimizer(weights, len(folders["train"].classes), device)
    history, start = [], time.perf_counter()
    for _ in range(epochs):
        run_phase(model, optimizer, loader(folders["train"], "train"), "train", device)
        scheduler.step()
        seen, correct = run_phase(model, optimizer, loader(folders["val"], "val"), "val", device)
        history.append(correct / seen)
    seconds = time.perf_counter() - start
    images = sum(len(f) for f in folders.values())
    return {"epochs": epochs, "seconds": seconds, "epoch_seconds": seconds / epochs, "val_accuracy": max(history),
            "history": history, "images": images, "images_per_s": images * epochs / seconds}
