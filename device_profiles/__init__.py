"""Device profiles: declarative YAML files that pick execution providers and the export recipe.

``load_profile("rpi5")`` reads a built-in profile; ``load_profile("my.yaml")`` a user's file,
which may ``extends:`` a built-in one. See ``schema.py`` for every field.
"""

from .loader import (
    builtin_names, load_builtin_profiles, load_profile, profile_summary, session_kwargs,
)
from .schema import DeviceProfile

__all__ = ["DeviceProfile", "builtin_names", "load_builtin_profiles", "load_profile",
           "profile_summary", "session_kwargs"]
