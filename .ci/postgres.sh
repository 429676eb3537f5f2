# shellcheck shell=bash
# Start a throw-away PostgreSQL on loopback for the store tests and export its URL.
#
#   source .ci/postgres.sh          # CI: installs if missing, starts, exports REGIONSEARCH_TEST_PG_URL
#   python -m pytest tests/test_store_index.py -q
#
# Idempotent: safe to source again (installs only when missing, starts only when down,
# creates the role and database only when absent). Debian/Ubuntu (pg_ctlcluster); runs as root
# or with passwordless sudo. Override with PG_USER / PG_PASSWORD / PG_DB / PG_PORT.
# The tests create one schema per test inside this database and drop it afterwards.

_rs_pg_main() {
    local user="${PG_USER:-regionsearch}"
    local password="${PG_PASSWORD:-regionsearch}"
    local db="${PG_DB:-regionsearch_test}"
    local port="${PG_PORT:-5432}"
    local sudo=""
    if [ "$(id -u)" != "0" ]; then sudo="sudo"; fi

    # 1. install (only when the server binaries are missing)
    if ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
        $sudo apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq postgresql >/dev/null
    fi

    # 2. start the first cluster (Debian creates "<version> main" on install)
    local version cluster
    version="$(pg_lsclusters -h | awk 'NR==1 {print $1}')"
    cluster="$(pg_lsclusters -h | awk 'NR==1 {print $2}')"
    if [ -z "$version" ]; then
        version="$(ls /usr/lib/postgresql | sort -V | tail -n1)"
        cluster="main"
        $sudo pg_createcluster "$version" "$cluster" --port "$port" >/dev/null
    fi
    if ! pg_lsclusters -h | awk -v v="$version" -v c="$cluster" '$1==v && $2==c {print $4}' | grep -q online; then
        $sudo pg_ctlcluster "$version" "$cluster" start
    fi
    port="$(pg_lsclusters -h | awk -v v="$version" -v c="$cluster" '$1==v && $2==c {print $3}')"

    # psql as the postgres superuser (peer auth on the local socket)
    _rs_psql() {
        if [ -n "$sudo" ]; then
            sudo -u postgres psql -p "$port" -v ON_ERROR_STOP=1 -tAc "$1"
        else
            su postgres -c "psql -p $port -v ON_ERROR_STOP=1 -tAc \"$1\""
        fi
    }

    # wait until it accepts connections (pg_ctlcluster returns once started, but be safe)
    local i
    for i in $(seq 1 30); do
        if _rs_psql "SELECT 1" >/dev/null 2>&1; then break; fi
        sleep 1
    done

    # 3. role + database (password auth over 127.0.0.1: the default pg_hba uses scram-sha-256)
    if [ "$(_rs_psql "SELECT 1 FROM pg_roles WHERE rolname='${user}'")" != "1" ]; then
        _rs_psql "CREATE ROLE ${user} LOGIN PASSWORD '${password}'" >/dev/null
    else
        _rs_psql "ALTER ROLE ${user} LOGIN PASSWORD '${password}'" >/dev/null
    fi
    if [ "$(_rs_psql "SELECT 1 FROM pg_database WHERE datname='${db}'")" != "1" ]; then
        _rs_psql "CREATE DATABASE ${db} OWNER ${user}" >/dev/null
    fi

    export REGIONSEARCH_TEST_PG_URL="postgresql+psycopg2://${user}:${password}@127.0.0.1:${port}/${db}"
    echo "export REGIONSEARCH_TEST_PG_URL=${REGIONSEARCH_TEST_PG_URL}"
}

_rs_pg_main "$@"
unset -f _rs_pg_main _rs_psql
