# messaging-proxy container image.
#   docker build -t messaging-proxy:0.1.0 .
#   docker run -p 50055:50055 -p 9464:9464 -e RABBITMQ_HOST=rabbit messaging-proxy:0.1.0
# The build stage compiles TypeScript; the runtime stage holds only dist/, the descriptors that
# reflection serves (gen/*.binpb) and the production dependencies, and runs as the unprivileged
# `node` user. test/deploy.test.ts installs the production dependencies alone and starts the
# built proxy from them, which shows nothing at run time needs a dev dependency.

FROM node:22-bookworm-slim AS build
WORKDIR /app
COPY package.json package-lock.json ./
# Optional dependencies are the Node binary npm scripts use on older hosts (the image has Node 22).
RUN npm ci --omit=optional
COPY tsconfig.json tsconfig.build.json ./
COPY gen ./gen
COPY src ./src
RUN npm run build

FROM node:22-bookworm-slim AS runtime
ENV NODE_ENV=production \
    MESSAGING_CONNECTION_HOST=0.0.0.0 \
    METRICS_HOST=0.0.0.0
WORKDIR /app
COPY package.json package-lock.json ./
RUN npm ci --omit=dev --omit=optional && npm cache clean --force
COPY --from=build /app/dist ./dist
COPY gen/messaging.binpb gen/health.binpb ./gen/
USER node
EXPOSE 50055 9464
# SIGTERM ends open calls with UNAVAILABLE, requeues what is unsettled and exits 0 within
# MESSAGING_SHUTDOWN_TIMEOUT_SECONDS (10 by default).
STOPSIGNAL SIGTERM
# Through the gRPC health service (the CLI's `health`: exit 0 when SERVING). With GRPC_TLS_ENABLED,
# add --tls --ca <path> (and --cert/--key for mutual TLS).
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
  CMD ["node", "dist/src/cli.js", "--host", "127.0.0.1", "--timeout", "4", "health"]
CMD ["node", "dist/src/main.js"]
