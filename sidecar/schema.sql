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

-- Invalidation (SPEC 3.4): every change of a token row that can change an auth decision
-- NOTIFYs the sidecars, which drop the cached entries at once. The payload is a JSON array of
-- {"h": sha256 of the token column, "s": type, "t": tenant_id}: never the token itself.
-- The channel is the trigger argument (SIDECAR_NOTIFY_CHANNEL; `sidecar schema` fills it in).
-- The last-used writes of the sidecar itself change only last_used_at and notify nobody.
CREATE OR REPLACE FUNCTION sidecar_token_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    changes jsonb := '[]'::jsonb;
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        PERFORM pg_notify(TG_ARGV[0], '[{"all": true}]');
        RETURN NULL;
    END IF;
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        changes := changes || jsonb_build_object(
            'h', encode(sha256(convert_to(OLD.token, 'UTF8')), 'hex'),
            's', OLD.type, 't', OLD.tenant_id);
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        -- INSERT too: a token tried before it existed is negatively cached; drop that.
        changes := changes || jsonb_build_object(
            'h', encode(sha256(convert_to(NEW.token, 'UTF8')), 'hex'),
            's', NEW.type, 't', NEW.tenant_id);
    END IF;
    PERFORM pg_notify(TG_ARGV[0], changes::text);
    RETURN NULL;
END;
$$;

DROP TRIGGER IF EXISTS sidecar_token_write ON api_tokens;
CREATE TRIGGER sidecar_token_write AFTER INSERT OR DELETE ON api_tokens
    FOR EACH ROW EXECUTE FUNCTION sidecar_token_notify('sidecar_invalidate');

DROP TRIGGER IF EXISTS sidecar_token_update ON api_tokens;
CREATE TRIGGER sidecar_token_update AFTER UPDATE ON api_tokens
    FOR EACH ROW
    WHEN ((to_jsonb(OLD) - 'last_used_at') IS DISTINCT FROM (to_jsonb(NEW) - 'last_used_at'))
    EXECUTE FUNCTION sidecar_token_notify('sidecar_invalidate');

DROP TRIGGER IF EXISTS sidecar_token_truncate ON api_tokens;
CREATE TRIGGER sidecar_token_truncate AFTER TRUNCATE ON api_tokens
    FOR EACH STATEMENT EXECUTE FUNCTION sidecar_token_notify('sidecar_invalidate');
