{
  description = "messaging-proxy: gRPC proxy in front of RabbitMQ (Effect 4)";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs = { self, nixpkgs }:
    let
      systems = [ "x86_64-linux" "aarch64-linux" "x86_64-darwin" "aarch64-darwin" ];
      forAll = f: nixpkgs.lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});
    in {
      # The built proxy: `nix build`, then `result/bin/messaging-proxy` (and `messaging-proxy-cli`).
      # Dependencies come from package-lock.json through importNpmLock (each fetched by the
      # integrity hash the lock already records), so no npmDepsHash is needed.
      packages = forAll (pkgs: {
        default = pkgs.buildNpmPackage {
          pname = "messaging-proxy";
          version = "0.1.0";
          src = ./.;
          nodejs = pkgs.nodejs_22;
          npmDeps = pkgs.importNpmLock { npmRoot = ./.; };
          npmConfigHook = pkgs.importNpmLock.npmConfigHook;
          # The optional dependency is the Node binary npm scripts use on older hosts: not needed here.
          npmFlags = [ "--omit=optional" ];
          npmBuildScript = "build";
          nativeBuildInputs = [ pkgs.makeWrapper ];
          installPhase = ''
            runHook preInstall
            npm prune --omit=dev --omit=optional --no-save
            app=$out/lib/messaging-proxy
            mkdir -p $app/gen $out/bin
            cp -r dist node_modules package.json $app/
            cp gen/messaging.binpb gen/health.binpb $app/gen/
            makeWrapper ${pkgs.nodejs_22}/bin/node $out/bin/messaging-proxy --add-flags $app/dist/src/main.js
            makeWrapper ${pkgs.nodejs_22}/bin/node $out/bin/messaging-proxy-cli --add-flags $app/dist/src/cli.js
            runHook postInstall
          '';
        };
      });

      # `nix run`: the proxy, configured by the environment (README "Configuration").
      apps = forAll (pkgs: {
        default = {
          type = "app";
          program = "${self.packages.${pkgs.stdenv.hostPlatform.system}.default}/bin/messaging-proxy";
        };
      });

      devShells = forAll (pkgs: {
        default = pkgs.mkShell {
          packages = [
            pkgs.nodejs_22 pkgs.rabbitmq-server pkgs.buf pkgs.openssl
            # The compatibility tests' third-party clients (test/support/python.ts).
            pkgs.protobuf
            (pkgs.python3.withPackages (ps: [ ps.grpcio ps.pika ps.protobuf ]))
          ];
          shellHook = ''
            export TEST_PYTHON=$(command -v python3)
            export RABBITMQ_MNESIA_BASE=$PWD/.rabbitmq/mnesia RABBITMQ_LOG_BASE=$PWD/.rabbitmq/log
            echo "messaging-proxy dev shell: node $(node --version); start a broker with 'rabbitmq-server -detached'"
          '';
        };
      });
    };
}
