"""Configuration and modelling files that :func:`ziplm_ext.deploy.hf.export_hf` copies into an exported
directory, so that plain ``transformers`` loads the pruned model with ``trust_remote_code=True``.

They import only torch and transformers (and each other, relatively): the exported directory must load
where ziplm_ext is not installed.
"""
