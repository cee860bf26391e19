"""The ``bayesfake`` command: one entry point for the path data -> train -> evaluate -> export -> load -> serve.

The work itself lives in the packages: ``train`` (data, training, evaluation), ``hub_models`` (the detector code,
export, offline loading), ``space`` (the Gradio Space). This package only dispatches to their command lines.
"""
