"""Fidelity and speed evaluation on a real model, offline."""

from .fidelity import Fidelity, TeacherForcing, full_cache_reference, teacher_forced
from .models import chat_prompt, load_smollm2, smollm2_checkpoint

__all__ = ["Fidelity", "TeacherForcing", "chat_prompt", "full_cache_reference", "load_smollm2",
           "smollm2_checkpoint", "teacher_forced"]
