"""Hugging Face export and import (DESIGN section 5).

    configuration_atlas.py   AtlasConfig: the ModelConfig as a PretrainedConfig
    modeling_atlas.py        AtlasForCausalLM: PreTrainedModel + GenerationMixin around AtlasLM
    vendor.py                copies the model sources into the export folder (no project import at load)
    tokenizer.py             tokenizer files (trained BPE, or a byte-level tokenizer.json)
    convert.py               native checkpoint <-> Hugging Face folder

The configuration and modeling modules import transformers; import them explicitly.
"""
