"""The portrait generator: main-face crop plus emotion-driven low-fi stylization.

``stage.GeneratorStage`` is the pipeline stage; ``lowfi`` holds its pure torch ops.
"""

from stages.generator.stage import GeneratorConfig, GeneratorStage

__all__ = ["GeneratorConfig", "GeneratorStage"]
