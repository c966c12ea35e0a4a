"""The portrait generator: the primary face, framed by its landmarks, stylized by a
learned style net (or the low-fi fallback) from the face's emotion.

``stage.GeneratorStage`` is the pipeline stage; ``framing`` decides and cuts the window,
``renderers`` style it (``stylenet`` + ``style_table``, or ``lowfi``), ``temporal``
smooths the result.
"""

from stages.generator.stage import GeneratorConfig, GeneratorStage

__all__ = ["GeneratorConfig", "GeneratorStage"]
