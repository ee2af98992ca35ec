-- Token table of the API-key auth sidecar (Dify-compatible: same shape as Dify's api_tokens).
-- Safe to apply to a database that already has this table: every statement is idempotent and
-- none changes an existing column.
--   token        the raw token (SIDECAR_TOKEN_HASH=plain) or its lowercase hex SHA-256 (sha256)
--   type         the token's scope, e.g. 'app' or 'dataset'
--   last_used_at naive UTC, written behind in batches by the sidecar
-- Note: token is deliberately not unique, as in Dify.

CREATE TABLE IF NOT EXISTS api_tokens (
    id           uuid         NOT NULL DEFAULT gen_random_uuid(),
    app_id       uuid         NULL,
    tenant_id    uuid         NULL,
    type         varchar(16)  NOT NULL,
    token        varchar(255) NOT NULL,
    last_used_at timestamp    NULL,
    created_at   timestamp    NOT NULL DEFAULT CURRENT_TIMESTAMP,
    CONSTRAINT api_token_pkey PRIMARY KEY (id)
);

CREATE INDEX IF NOT EXISTS api_token_token_idx ON api_tokens (token, type);
