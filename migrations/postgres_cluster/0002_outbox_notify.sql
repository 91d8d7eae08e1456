-- Webhook deliveries queued by a job that ended on one instance wake the senders of the others
-- (instances with the webhooks role), and only when there is something to send: a job without a
-- webhook costs the other instances nothing. The payload is the writer's application_name.
CREATE FUNCTION comfyq_notify_outbox() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('comfyq_outbox', current_setting('application_name'));
    RETURN NULL;
END;
$$;

CREATE TRIGGER webhook_deliveries_notify
AFTER INSERT ON webhook_deliveries
FOR EACH STATEMENT EXECUTE FUNCTION comfyq_notify_outbox();
