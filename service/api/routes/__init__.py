"""One module per API area; `ROUTERS` is what the app mounts."""

from service.api.routes import admin, embed, health, identify, identities, model, verify

ROUTERS = [
    health.router,
    embed.router,
    identify.router,
    verify.router,
    identities.router,
    model.router,
    admin.router,
]
