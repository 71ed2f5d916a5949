#!/bin/sh
# check-secrets.sh COMMAND [ARGS...]: refuse to start a service that still holds one of the
# example's placeholder secrets (docker/.env.example says `change-me...`), then run COMMAND.
#
# Every container of docker/compose.yaml starts through this script (the hpo and mlflow
# images as their ENTRYPOINT, postgres by an entrypoint override), so a copied .env.example
# fails at `docker compose up` with one line naming the variables, never their values.
# Variables listed in HPO_REQUIRED_SECRETS must also be set and non-empty.
set -eu
service="${HPO_SERVICE:-$(hostname 2>/dev/null || echo service)}"
placeholder=""
missing=""
for name in $(env | sed -n 's/^\([A-Za-z_][A-Za-z0-9_]*\)=.*/\1/p'); do
    eval "value=\${$name-}"
    case "$value" in
        *change-me*) placeholder="${placeholder:+$placeholder, }$name" ;;
    esac
done
for name in ${HPO_REQUIRED_SECRETS:-}; do
    eval "value=\${$name-}"
    [ -n "$value" ] || missing="${missing:+$missing, }$name"
done
if [ -n "$placeholder" ]; then
    echo "$service: refusing to start: $placeholder: still the example's 'change-me' placeholder; set real secrets in docker/.env (e.g. openssl rand -hex 24)" >&2
    exit 2
fi
if [ -n "$missing" ]; then
    echo "$service: refusing to start: $missing: not set; set them in docker/.env (see docker/.env.example)" >&2
    exit 2
fi
[ "$#" -gt 0 ] || exit 0
exec "$@"
