"""
L{ConfigError}, apart from L{twisted_slb.config}: the modules that check
files a configuration names (certificates, keys, CAs in L{twisted_slb.tls})
raise it without importing the configuration loader.
"""

__all__ = ["ConfigError"]


class ConfigError(Exception):
    """
    A configuration file is invalid.

    C{str(error)} is the complete message for a person: the file, the field
    path, the bad value and what is allowed.
    """
