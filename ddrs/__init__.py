"""ddrs: certifiably robust classification with data-dependent randomized smoothing.

The names a user needs, importable from here (`from ddrs import Smooth, certify_dataset`):

- `Smooth`: CERTIFY and PREDICT (Cohen et al., 2019) around any classifier, a sigma per input;
  `family="uniform"` certifies L1 radii (uniform noise of half-width lambda = sigma),
  `family="discrete"` samples the Gaussian exactly on the 1/255 lattice of 8-bit images
  (`noise_family(norm, noise)` names them as the command line does).
- `certified_sigma_search`, `sigma_search` (the paper's ascent), `grid_sigma_search`: a sigma
  per input.
- `CertificationMemory`, `DataDependentSmoothClassifier`, `memory_fingerprint`: the memory
  that makes per-input sigmas certifiable, and the online classifier around it.
- `certify_dataset`, `predict_dataset`, `sigma_dataset` with their run specifications
  `CertifyRun`, `PredictRun`, `SigmaRun`: whole datasets (ours, a `TensorDataset`, or a pair
  of tensors), resumable, exactly as the command line runs them.
- `train_model` (`ddrs.train.loop.train`), `TrainConfig`, `load_checkpoint`, `get_dataset`:
  training and loading.
"""

from ddrs.classifier import DataDependentSmoothClassifier
from ddrs.core.experts import Expert, Experts
from ddrs.core.families import noise_family
from ddrs.core.sigma import certified_sigma_search, grid_sigma_search, sigma_search
from ddrs.core.smooth import Certificate, Smooth
from ddrs.data import get_dataset
from ddrs.data.tensors import as_dataset
from ddrs.memory import Answer, CertificationMemory
from ddrs.models import load_checkpoint
from ddrs.models.identity import memory_fingerprint
from ddrs.runs import (
    CertifyRun,
    PredictRun,
    SigmaRun,
    certify_dataset,
    predict_dataset,
    sigma_dataset,
)
from ddrs.train.config import TrainConfig
from ddrs.train.loop import train as train_model

__version__ = "0.2.0"

__all__ = [
    "Answer",
    "Certificate",
    "CertificationMemory",
    "CertifyRun",
    "DataDependentSmoothClassifier",
    "Expert",
    "Experts",
    "PredictRun",
    "SigmaRun",
    "Smooth",
    "TrainConfig",
    "__version__",
    "as_dataset",
    "certified_sigma_search",
    "certify_dataset",
    "get_dataset",
    "grid_sigma_search",
    "load_checkpoint",
    "memory_fingerprint",
    "noise_family",
    "predict_dataset",
    "sigma_dataset",
    "sigma_search",
    "train_model",
]
