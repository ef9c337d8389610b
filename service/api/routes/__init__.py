"""One module per API area; `ROUTERS` is what the app mounts."""

from service.api.routes import admin, embed, health, identify, identities, model, v2, verify

ROUTERS = [
    health.router,
    embed.router,
    identify.router,
    verify.router,
    identities.router,
    model.router,
    admin.router,
    v2.router,
]
