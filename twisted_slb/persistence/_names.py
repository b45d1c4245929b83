"""
Checking the names policies read (cookie and header names): RFC 9110
tokens, shared by the cookie policies and the table policies.
"""

from __future__ import annotations

import re
from typing import Union

#: RFC 6265 / RFC 9110 token: the characters a cookie or header name may use.
TOKEN = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")


def cookie_name(name: Union[bytes, str]) -> bytes:
    """
    A cookie name as bytes, checked.

    @raise ValueError: the name is empty or not an RFC 6265 token.
    """
    if isinstance(name, str):
        try:
            name = name.encode("ascii")
        except UnicodeEncodeError:
            raise ValueError(f"cookie name {name!r} is not ASCII") from None
    if not TOKEN.match(name):
        raise ValueError(f"cookie name {name!r} is not a valid token (letters, digits, !#$%&'*+-.^_`|~)")
    return name
