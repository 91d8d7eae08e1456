"""The Comfy API v2 (../shared/spec/comfy-api-v2.yaml) over comfyq's own store, stages and bus.

``routes`` is the route table, ``mapping`` the one place store rows become v2 objects,
``submit`` the submission checks, ``assets``/``blobs`` the uploads, ``events`` the SSE stream,
``progress`` the v2 progress of running jobs, ``resolve`` the ``core/ASSET`` resolution of the
preprocess stage.
"""
