#!/bin/sh
# One-shot MinIO setup for compose (run by the minio-init service; idempotent).
#  1. bucket `clinisynth`, versioned (overwritten checkpoints and records can be recovered)
#  2. a policy that allows only that bucket, and the services' user with it (not the root user)
#  3. the Triton model repository copied to s3://clinisynth/model-repository (mirror, no deletes)
#  4. with compose.s3-models.yaml: Triton's own user, which may only read model-repository/
set -eu

mc alias set local http://minio:9000 "$MINIO_ROOT_USER" "$MINIO_ROOT_PASSWORD" >/dev/null
mc mb --ignore-existing local/clinisynth
mc version enable local/clinisynth

cat >/tmp/clinisynth-rw.json <<'POLICY'
{
  "Version": "2012-10-17",
  "Statement": [
    {"Effect": "Allow", "Action": ["s3:GetBucketLocation", "s3:ListBucket", "s3:ListBucketMultipartUploads"],
     "Resource": ["arn:aws:s3:::clinisynth"]},
    {"Effect": "Allow", "Action": ["s3:GetObject", "s3:PutObject", "s3:DeleteObject",
                                   "s3:AbortMultipartUpload", "s3:ListMultipartUploadParts"],
     "Resource": ["arn:aws:s3:::clinisynth/*"]}
  ]
}
POLICY
mc admin policy create local clinisynth-rw /tmp/clinisynth-rw.json
mc admin user add local "$STORE_ACCESS_KEY" "$STORE_SECRET_KEY"
mc admin policy attach local clinisynth-rw --user "$STORE_ACCESS_KEY" 2>/dev/null || true

if [ -d /model-repository ] && [ -n "$(ls -A /model-repository 2>/dev/null)" ]; then
  mc mirror --overwrite /model-repository local/clinisynth/model-repository
fi
TRITON_ACCESS_FILE=/run/secrets/triton-store-access-key
TRITON_SECRET_FILE=/run/secrets/triton-store-secret-key
if [ -r "$TRITON_ACCESS_FILE" ] && [ -r "$TRITON_SECRET_FILE" ]; then
  # Object names may be listed (Triton walks the repository); only model-repository/ is readable.
  cat >/tmp/clinisynth-models-ro.json <<'POLICY'
{
  "Version": "2012-10-17",
  "Statement": [
    {"Effect": "Allow", "Action": ["s3:GetBucketLocation", "s3:ListBucket"],
     "Resource": ["arn:aws:s3:::clinisynth"]},
    {"Effect": "Allow", "Action": ["s3:GetObject"],
     "Resource": ["arn:aws:s3:::clinisynth/model-repository/*"]}
  ]
}
POLICY
  TRITON_ACCESS_KEY=$(cat "$TRITON_ACCESS_FILE")
  mc admin policy create local clinisynth-models-ro /tmp/clinisynth-models-ro.json
  mc admin user add local "$TRITON_ACCESS_KEY" "$(cat "$TRITON_SECRET_FILE")"
  mc admin policy attach local clinisynth-models-ro --user "$TRITON_ACCESS_KEY" 2>/dev/null || true
fi
echo "minio-init: bucket clinisynth ready"
