"""User-facing errors: the CLI prints them as one line and exits with code 2."""


class RegflowError(Exception):
    """A problem with the user's input (file, config, request) rather than a bug in regflow."""


class ConfigError(RegflowError):
    """params.yaml or an override names an unknown key or holds a bad value."""


class DataError(RegflowError):
    """A dataset file is missing, corrupt, fails its checksum or does not match its partner."""


class RequestTooLarge(RegflowError):
    """An input exceeds a configured resource limit (voxels, bytes, pairs, memory): HTTP 413."""


class ServerBusy(RegflowError):
    """The server's memory budget stayed taken for as long as a request may wait: HTTP 503."""


class GeometryError(DataError):
    """A volume's grid or affine cannot be registered (singular, non-finite, too small): 400."""


class NothingToRegister(DataError):
    """An image carries no structure to align (constant or blank): HTTP 422."""
