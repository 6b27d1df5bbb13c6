"""The served model as code: ``regflow register`` logs this file (MLflow "models from code").

MLflow runs it when the model is logged and again when it is loaded, instead of unpickling a
cloudpickled object; the model itself is :class:`regflow.serving.model.RegflowPythonModel`, which
reads the checkpoint artifact in ``load_context``. Not meant to be imported by regflow itself.
"""

import mlflow

from regflow.serving.model import RegflowPythonModel

mlflow.models.set_model(RegflowPythonModel())
