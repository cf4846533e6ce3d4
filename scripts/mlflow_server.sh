#!/usr/bin/env bash
# A team MLflow tracking server: runs in a PostgreSQL database, artifacts in one place every node
# reaches (a shared directory or a bucket), uploaded and downloaded *through the server*
# (--serve-artifacts), so training nodes need neither database nor storage credentials.
#
#   MLFLOW_BACKEND_STORE_URI=postgresql://mlflow:PASSWORD@db-host:5432/mlflow \
#   MLFLOW_ARTIFACTS_DESTINATION=/shared/mlflow/artifacts \
#   bash scripts/mlflow_server.sh --port 5000
#
# Training runs then point at it:
#   rescalelab-train logger.tracking_uri=http://<this host>:5000 ...
#   export MLFLOW_TRACKING_URI=http://<this host>:5000          # or, for every command
#
# Options (each also read from the environment variable in brackets):
#   --backend-store-uri URI      [MLFLOW_BACKEND_STORE_URI]  default postgresql://mlflow@localhost:5432/mlflow
#                                (any SQLAlchemy URI: sqlite:///path/mlflow.db for a quick test)
#   --artifacts-destination URI  [MLFLOW_ARTIFACTS_DESTINATION]  default ./mlartifacts
#                                (a directory, or s3://…, gs://…: whatever the *server* can write)
#   --host HOST                  [MLFLOW_HOST]     default 0.0.0.0 (every interface)
#   --port PORT                  [MLFLOW_PORT]     default 5000
#   --workers N                  [MLFLOW_WORKERS]  default 4
#   --allowed-hosts LIST         [MLFLOW_SERVER_ALLOWED_HOSTS]  Host headers the server accepts;
#                                default this host's names and private addresses, any port
# Anything after -- goes to `mlflow server` unchanged.
set -euo pipefail

here="$(cd "$(dirname "$0")/.." && pwd)"
backend="${MLFLOW_BACKEND_STORE_URI:-postgresql://mlflow@localhost:5432/mlflow}"
artifacts="${MLFLOW_ARTIFACTS_DESTINATION:-$PWD/mlartifacts}"
host="${MLFLOW_HOST:-0.0.0.0}"
port="${MLFLOW_PORT:-5000}"
workers="${MLFLOW_WORKERS:-4}"
short="$(hostname -s 2>/dev/null || hostname)"
full="$(hostname -f 2>/dev/null || hostname)"
allowed="${MLFLOW_SERVER_ALLOWED_HOSTS:-localhost,localhost:*,127.0.0.1,127.0.0.1:*,$short,$short:*,$full,$full:*,10.*,192.168.*,172.1[6-9].*,172.2[0-9].*,172.3[01].*}"

usage() { sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --backend-store-uri) backend="$2"; shift 2 ;;
    --artifacts-destination) artifacts="$2"; shift 2 ;;
    --host) host="$2"; shift 2 ;;
    --port) port="$2"; shift 2 ;;
    --workers) workers="$2"; shift 2 ;;
    --allowed-hosts) allowed="$2"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) echo "error: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

mlflow="${MLFLOW_BIN:-}"
if [[ -z "$mlflow" ]]; then
  if [[ -x "$here/.venv/bin/mlflow" ]]; then mlflow="$here/.venv/bin/mlflow"; else mlflow="$(command -v mlflow || true)"; fi
fi
[[ -n "$mlflow" ]] || { echo "error: mlflow not found: run scripts/setup.sh or pip install mlflow" >&2; exit 2; }
python="$(dirname "$mlflow")/python"
[[ -x "$python" ]] || python="$(command -v python3)"

# The database driver SQLAlchemy picks for this URI (postgresql:// -> psycopg 3) must import.
if ! missing="$("$python" - "$backend" 2>&1 <<'PY'
import sys
from sqlalchemy.engine import make_url
make_url(sys.argv[1]).get_dialect().import_dbapi()
PY
)"; then
  echo "error: no database driver for the backend store: ${missing##*$'\n'}" >&2
  echo "       for postgresql://: $python -m pip install 'psycopg[binary]'" >&2
  exit 2
fi
case "$artifacts" in
  *://*) ;;                                              # a bucket or other remote store
  *) mkdir -p "$artifacts"; artifacts="$(cd "$artifacts" && pwd)" ;;
esac

shown="$(printf '%s' "$backend" | sed -E 's#(://[^:/@]+):[^@]*@#\1:***@#')"   # hide the password
echo "MLflow tracking server on $host:$port" >&2
echo "  backend store: $shown" >&2
echo "  artifacts:     $artifacts (served through the server)" >&2
echo "  clients:       logger.tracking_uri=http://$full:$port   or   export MLFLOW_TRACKING_URI=http://$full:$port" >&2
exec "$mlflow" server \
  --backend-store-uri "$backend" \
  --serve-artifacts --artifacts-destination "$artifacts" \
  --host "$host" --port "$port" --workers "$workers" \
  --allowed-hosts "$allowed" \
  "$@"
