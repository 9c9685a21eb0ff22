"""What the routers get from the app: its ``Gateway`` and the API-key check."""
from __future__ import annotations

from fastapi import Depends, Request

from .service import Gateway

__all__ = ["gateway", "check_key", "AUTHED"]


def gateway(request: Request) -> Gateway:
    """The app's ``Gateway`` (``create_app`` puts it in ``app.state``)."""
    return request.app.state.gateway


async def check_key(request: Request) -> None:
    await gateway(request).check_key(request)


#: ``dependencies=AUTHED`` on a route: it needs an API key when the server has keys
AUTHED = [Depends(check_key)]
