from .config import PersonaMuxConfig, PersonaMuxInit
from .layer import PersonaMuxLayer
from .model import PersonaMuxModel

__all__ = ["PersonaMuxConfig", "PersonaMuxInit", "PersonaMuxLayer", "PersonaMuxModel"]
