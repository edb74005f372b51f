-- Account features the Bluesky app expects from its PDS: app passwords,
-- preferences, invite codes and out-of-band tokens. (Numbered 0010 so that
-- concurrent branches can add 0004..0009 without colliding.)

-- Passwords a user hands to third-party apps. Sessions opened with one carry
-- its name, so revoking it ends them.
CREATE TABLE app_password (
    did           TEXT NOT NULL REFERENCES account(did) ON DELETE CASCADE,
    name          TEXT NOT NULL,
    password_hash TEXT NOT NULL,
    privileged    INTEGER NOT NULL,
    created_at    TEXT NOT NULL,
    PRIMARY KEY (did, name)
) STRICT;
ALTER TABLE session ADD COLUMN app_password_name TEXT;

-- `app.bsky.actor.getPreferences` state, in the order the client put it.
CREATE TABLE preference (
    did      TEXT NOT NULL REFERENCES account(did) ON DELETE CASCADE,
    position INTEGER NOT NULL,
    type     TEXT NOT NULL,
    value    TEXT NOT NULL,
    PRIMARY KEY (did, position)
) STRICT;

CREATE TABLE invite_code (
    code        TEXT PRIMARY KEY,
    available   INTEGER NOT NULL,
    disabled    INTEGER NOT NULL DEFAULT 0,
    for_account TEXT NOT NULL,
    created_by  TEXT NOT NULL,
    created_at  TEXT NOT NULL
) STRICT;
CREATE TABLE invite_code_use (
    code    TEXT NOT NULL REFERENCES invite_code(code),
    used_by TEXT NOT NULL,
    used_at TEXT NOT NULL,
    PRIMARY KEY (code, used_by)
) STRICT;

-- Tokens delivered out of band (email, or `roost account tokens` when no
-- email is configured), e.g. for deleteAccount. Plain text like the
-- reference PDS's email_token: they are short-lived and the database is
-- already as secret as the keys beside it.
CREATE TABLE account_token (
    did        TEXT NOT NULL REFERENCES account(did) ON DELETE CASCADE,
    purpose    TEXT NOT NULL,
    token      TEXT NOT NULL,
    expires_at INTEGER NOT NULL,
    PRIMARY KEY (did, purpose)
) STRICT;
